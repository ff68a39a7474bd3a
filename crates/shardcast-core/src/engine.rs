//! The engine's handle: the one local publish function, the interest map, connection
//! reservation and the messages a connection's reader sends its shard, the drain, and stats.
//! The per-shard client state lives in `shard/`; admission, auth and the bus live in the
//! server crate, which reaches the engine only through this API.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::EngineConfig;
use crate::frame::{self, Opcode};
use crate::interest::{Interest, InterestWatcher};
use crate::shard::{ConnShared, Guard, INBOX, Shard, ShardMsg, ShardStats};
use crate::stats::{FANOUT_BOUNDS, Histogram, QUEUE_BOUNDS};
use crate::{DisconnectCounts, DisconnectReason, Error, Topic};

/// Where a message entered the publish function (the `source` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A WebSocket client.
    Ws = 0,
    /// `POST /publish`.
    Http = 1,
    /// An embedder calling the server's publish.
    Api = 2,
    /// Another node, through the bus: delivered locally, never sent back to the bus.
    Bus = 3,
}

/// A connection's place on its shard, returned by [`Engine::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub(crate) shard: usize,
    pub(crate) key: usize,
    pub(crate) id: u64,
}

impl Slot {
    /// The shard the connection lives on.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The connection's id: unique for the life of the engine.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The engine's counters, summed over every shard at the moment of asking.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// WebSocket clients currently held by shards (including those still closing).
    pub connections: usize,
    /// `connections`, per shard, in shard order.
    pub shard_connections: Vec<usize>,
    /// WebSocket connections accepted since start.
    pub connections_opened: u64,
    /// Bytes written to client sockets.
    pub bytes_sent: u64,
    /// Messages accepted by the publish function from WebSocket clients.
    pub published_ws: u64,
    /// Messages accepted from `POST /publish`.
    pub published_http: u64,
    /// Messages accepted from embedders.
    pub published_api: u64,
    /// Messages from other nodes, received over the bus.
    pub published_bus: u64,
    /// Topics with at least one subscriber.
    pub topics: usize,
    /// Bytes queued per client, sampled now.
    pub send_queue: Histogram,
    /// Seconds from a publish to the end of its enqueue on each interested shard.
    pub publish_fanout: Histogram,
    /// Bytes queued for clients and not yet taken by the kernel.
    pub queued_bytes: usize,
    /// The most bytes any single client ever had queued.
    pub peak_client_queued_bytes: usize,
    /// Frames delivered: each frame appended to a ring, counted once per subscriber the ring
    /// had then (an excluded client included).
    pub deliveries: u64,
    /// Disconnects, by reason.
    pub disconnects: DisconnectCounts,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            connections: 0,
            shard_connections: Vec::new(),
            connections_opened: 0,
            bytes_sent: 0,
            published_ws: 0,
            published_http: 0,
            published_api: 0,
            published_bus: 0,
            topics: 0,
            send_queue: Histogram::new(QUEUE_BOUNDS),
            publish_fanout: Histogram::new(FANOUT_BOUNDS),
            queued_bytes: 0,
            peak_client_queued_bytes: 0,
            deliveries: 0,
            disconnects: DisconnectCounts::default(),
        }
    }
}

/// State shared by the engine's handles and its shards.
struct Inner {
    config: EngineConfig,
    /// One bounded inbox per shard. Sending awaits when a shard is behind, which pushes back
    /// on the publisher (its socket stops being read) instead of buffering without limit.
    shards: Vec<mpsc::Sender<ShardMsg>>,
    /// Shared with every shard, which writes its own bit of each topic's set.
    interest: Arc<Interest>,
    /// Round-robin cursor for spreading new connections over shards.
    next_shard: AtomicUsize,
    /// Source of connection ids; ids are never reused, so a stale message cannot hit a new
    /// client that took over a slab slot.
    next_conn_id: AtomicU64,
    /// Messages accepted by `publish`, indexed by [`Source`]. Relaxed: counted once per
    /// publish, never per delivery, and read only by scrapes.
    published: [AtomicU64; 4],
    /// Set when the drain starts: new reservations are refused, while open clients keep
    /// receiving until their turn to be closed.
    draining: AtomicBool,
    /// Set once the drain is over; publishes are refused from then on.
    shutting_down: AtomicBool,
}

/// A cheap, cloneable handle on a running engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("shards", &self.inner.shards.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Builds the engine without starting its shards: the inboxes are returned instead.
    fn detached(
        config: EngineConfig,
        watcher: Option<Arc<dyn InterestWatcher>>,
    ) -> (Self, Vec<mpsc::Receiver<ShardMsg>>) {
        let (senders, inboxes): (Vec<_>, Vec<_>) =
            (0..config.shards).map(|_| mpsc::channel(INBOX)).unzip();
        let engine = Self {
            inner: Arc::new(Inner {
                config,
                shards: senders,
                interest: Arc::new(Interest::new(watcher)),
                next_shard: AtomicUsize::new(0),
                next_conn_id: AtomicU64::new(1),
                published: Default::default(),
                draining: AtomicBool::new(false),
                shutting_down: AtomicBool::new(false),
            }),
        };
        (engine, inboxes)
    }

    /// Starts `config.shards` shard tasks on the current tokio runtime. `watcher` hears of
    /// every change to the interest map. The handles complete once the shards have stopped
    /// (after [`Engine::drain`] or [`Engine::shutdown_now`] has closed every client).
    pub fn start(
        config: EngineConfig,
        watcher: Option<Arc<dyn InterestWatcher>>,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let (engine, inboxes) = Self::detached(config, watcher);
        let shards = inboxes
            .into_iter()
            .enumerate()
            .map(|(i, inbox)| tokio::spawn(engine.shard(i).run(inbox)))
            .collect();
        (engine, shards)
    }

    /// Shard `index` of this engine, not yet running (`start` spawns them; tests and the
    /// bench fixture drive one directly).
    pub(crate) fn shard(&self, index: usize) -> Shard {
        Shard::new(
            index,
            self.inner.config.clone(),
            Arc::clone(&self.inner.interest),
        )
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Which topics have local subscribers.
    pub fn interest(&self) -> &Interest {
        &self.inner.interest
    }

    /// Delivers `payload` to this node's subscribers of `topic`: the frame is encoded once
    /// here and each shard that has a subscriber receives a refcounted clone of it.
    ///
    /// Refuses a payload over `max_message_bytes`, and everything once the drain is over.
    /// Returns the number of shards the message was queued to. Messages published by one
    /// task reach each subscriber in the order of the calls.
    pub async fn publish(
        &self,
        source: Source,
        topic: &Topic,
        opcode: Opcode,
        payload: &[u8],
    ) -> Result<usize, Error> {
        self.publish_skipping(source, topic, opcode, payload, None)
            .await
    }

    /// As [`Engine::publish`], except that the connection `skip` (the publisher, when its
    /// protocol asks not to hear its own messages) does not receive it. The frame is still
    /// encoded once and shared: the shard marks it in the ring, and that connection's
    /// writes step over it.
    pub async fn publish_skipping(
        &self,
        source: Source,
        topic: &Topic,
        opcode: Opcode,
        payload: &[u8],
        skip: Option<Slot>,
    ) -> Result<usize, Error> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let max = inner.config.max_message_bytes;
        if payload.len() > max {
            // Larger than a client may send, and possibly larger than a send queue: refusing
            // it here keeps one oversized publish from dropping every subscriber as slow.
            return Err(Error::MessageTooLarge {
                size: payload.len(),
                max,
            });
        }
        inner.published[source as usize].fetch_add(1, Ordering::Relaxed);
        let Some(set) = inner.interest.shards(topic) else {
            return Ok(0);
        };
        let at = Instant::now();
        let frame = frame::encode(opcode, payload);
        let mut queued = 0;
        for i in set.iter() {
            let msg = ShardMsg::Publish {
                topic: topic.clone(),
                frame: Bytes::clone(&frame),
                // Connection ids are unique across shards: other shards never match it.
                skip: skip.map(|s| s.id),
                at,
            };
            if inner.shards[i].send(msg).await.is_err() {
                return Err(Error::ShuttingDown);
            }
            queued += 1;
        }
        Ok(queued)
    }

    /// Places a new connection on a shard (round robin) under a fresh id and subscribes it
    /// to `topics` before returning, so every message published after this returns reaches
    /// it. Frames queue up until [`Engine::attach`] gives the shard the socket. `guard` is
    /// dropped when the shard frees the client. At `expires`, if given, the shard closes the
    /// client with 4010 `token expired` (counted as [`DisconnectReason::TokenExpired`]),
    /// within one tick of the shard's timer wheel; an instant already past closes it at the
    /// next tick.
    pub async fn reserve(
        &self,
        topics: Box<[Topic]>,
        conn: Arc<ConnShared>,
        guard: Guard,
        expires: Option<Instant>,
    ) -> Result<Slot, Error> {
        let inner = &self.inner;
        if self.is_draining() {
            return Err(Error::ShuttingDown);
        }
        let shard = inner.next_shard.fetch_add(1, Ordering::Relaxed) % inner.shards.len();
        let id = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let msg = ShardMsg::Reserve {
            id,
            topics,
            conn,
            guard,
            expires,
            reply,
        };
        self.send(shard, msg).await?;
        let key = rx.await.map_err(|_| Error::ShuttingDown)?;
        Ok(Slot { shard, key, id })
    }

    /// Hands the reserved connection's socket to its shard, which starts writing to it.
    pub async fn attach(&self, slot: Slot, stream: Arc<crate::Socket>) -> Result<(), Error> {
        let Slot { shard, key, id } = slot;
        self.send(shard, ShardMsg::Attach { key, id, stream }).await
    }

    /// Queues a control frame (a pong) for the client, in order with its data.
    pub async fn control(&self, slot: Slot, frame: Bytes) -> Result<(), Error> {
        let Slot { shard, key, id } = slot;
        self.send(shard, ShardMsg::Control { key, id, frame }).await
    }

    /// Closes the client with `code`: a protocol error, or the echo of the client's close.
    pub async fn close(
        &self,
        slot: Slot,
        code: u16,
        reason: &'static str,
        why: DisconnectReason,
    ) -> Result<(), Error> {
        let Slot { shard, key, id } = slot;
        let msg = ShardMsg::Close {
            key,
            id,
            code,
            reason,
            why,
        };
        self.send(shard, msg).await
    }

    /// Tells the shard that the client's reader has stopped.
    pub async fn gone(&self, slot: Slot) -> Result<(), Error> {
        let Slot { shard, key, id } = slot;
        self.send(shard, ShardMsg::Gone { key, id }).await
    }

    /// Fails only once the shard has stopped.
    async fn send(&self, shard: usize, msg: ShardMsg) -> Result<(), Error> {
        self.inner.shards[shard]
            .send(msg)
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    async fn tell_shards(&self, msg: impl Fn() -> ShardMsg) {
        for tx in &self.inner.shards {
            let _ = tx.send(msg()).await;
        }
    }

    /// Refuses new reservations from now on; open clients are served as before.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// Whether [`Engine::start_draining`] has been called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Closes every client with 1001, spread evenly until `until`, each with until
    /// `deadline` to finish its close. Shards stop once they have no clients.
    pub async fn drain(&self, until: Instant, deadline: Instant) {
        self.start_draining();
        self.tell_shards(|| ShardMsg::Drain { until, deadline })
            .await;
    }

    /// Closes every client with 1001 at once, with a one-second grace.
    pub async fn shutdown_now(&self) {
        self.start_draining();
        self.tell_shards(|| ShardMsg::Shutdown).await;
    }

    /// Refuses every publish from now on (the drain is over).
    pub fn stop_publishing(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
    }

    /// Sums the counters of every shard. Shards that have stopped are left out.
    pub async fn stats(&self) -> Stats {
        let inner = &self.inner;
        let published = |s: Source| inner.published[s as usize].load(Ordering::Relaxed);
        let mut total = Stats {
            published_ws: published(Source::Ws),
            published_http: published(Source::Http),
            published_api: published(Source::Api),
            published_bus: published(Source::Bus),
            topics: inner.interest.len(),
            ..Stats::default()
        };
        for tx in &inner.shards {
            let (reply, rx) = oneshot::channel();
            if tx.send(ShardMsg::Stats(reply)).await.is_err() {
                continue;
            }
            if let Ok(s) = rx.await {
                let ShardStats {
                    connections,
                    opened,
                    bytes_sent,
                    queued_bytes,
                    peak_client_queued_bytes,
                    deliveries,
                    disconnects,
                    send_queue,
                    publish_fanout,
                } = s;
                total.connections += connections;
                total.shard_connections.push(connections);
                total.connections_opened += opened;
                total.bytes_sent += bytes_sent;
                total.send_queue.merge(&send_queue);
                total.publish_fanout.merge(&publish_fanout);
                total.queued_bytes += queued_bytes;
                total.peak_client_queued_bytes =
                    total.peak_client_queued_bytes.max(peak_client_queued_bytes);
                total.deliveries += deliveries;
                total.disconnects.add(&disconnects);
            }
        }
        total
    }
}

/// Hooks for tests, benches and fuzz targets (feature `internals`); not part of the API.
#[cfg(any(test, feature = "internals"))]
impl Engine {
    /// An engine whose shards are not started: what would reach shard `i` waits in the
    /// `i`-th receiver, for a harness to inspect.
    pub fn without_shards(config: EngineConfig) -> (Self, Vec<mpsc::Receiver<ShardMsg>>) {
        Self::detached(config, None)
    }

    /// Marks shard `shard` as interested in `topic`, as its first subscriber would.
    pub fn mark_interest(&self, topic: &Topic, shard: usize) {
        self.inner.interest.join(topic, shard);
    }
}

#[cfg(any(test, feature = "internals"))]
impl Slot {
    /// A slot as a reservation on `shard` would return it.
    pub fn new(shard: usize, key: usize, id: u64) -> Self {
        Self { shard, key, id }
    }
}
