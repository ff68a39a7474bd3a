//! The shared relay state: the one publish function, the topic interest registry, and the
//! handle embedders and tests use. The per-shard client state lives in `shard.rs`, not here.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::auth::Auth;
use crate::bus::{Bus, BusStats};
use crate::config::{Config, MAX_SHARDS};
use crate::frame::{self, Opcode};
use crate::handshake::{RejectReason, Rejections};
use crate::metrics::{FANOUT_BOUNDS, Histogram, QUEUE_BOUNDS};
use crate::shard::{ShardMsg, ShardStats};
use crate::{Error, Topic};

/// A set of shard indexes, one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ShardSet([u64; MAX_SHARDS / 64]);

impl ShardSet {
    pub(crate) fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    pub(crate) fn remove(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    /// The set shards in increasing order, visiting only set bits.
    pub(crate) fn iter(self) -> impl Iterator<Item = usize> {
        self.0.into_iter().enumerate().flat_map(|(w, mut bits)| {
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + i)
            })
        })
    }
}

/// State shared by the accept loop, the HTTP handlers, the readers and the shards.
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// One bounded inbox per shard. Sending awaits when a shard is behind, which pushes back
    /// on the publisher (its socket stops being read) instead of buffering without limit.
    pub(crate) shards: Vec<mpsc::Sender<ShardMsg>>,
    /// Which shards have at least one subscriber of a topic.
    ///
    /// Invariant: bit `i` of a topic's set is written only by shard `i`, synchronously while
    /// it handles a subscribe (set on its first local subscriber) or an unsubscribe (cleared
    /// on its last). A topic with no bits set has no entry. Publish reads it once per message,
    /// never per delivery.
    pub(crate) interest: DashMap<Topic, ShardSet>,
    /// Round-robin cursor for spreading new connections over shards.
    next_shard: AtomicUsize,
    /// Source of connection ids; ids are never reused, so a stale message cannot hit a new
    /// client that took over a slab slot.
    next_conn_id: AtomicU64,
    /// One permit per WebSocket connection, held by the shard until the client is freed.
    permits: Arc<Semaphore>,
    /// WebSocket connections per client address, kept only with `--max-connections-per-ip`.
    ///
    /// Invariant: an address's count is the number of live [`IpSlot`]s for it; the slot that
    /// takes the count to zero removes the entry, so the map never holds an address with no
    /// connection. Touched once per connection (admit and free), never per message.
    per_ip: DashMap<IpAddr, u32>,
    /// Credentials and origin rules, parsed once at start.
    pub(crate) auth: Auth,
    /// Refused requests by reason.
    pub(crate) rejections: Rejections,
    /// Messages accepted by `publish`, indexed by [`Source`]. Relaxed: counted once per
    /// publish, never per delivery, and read only by scrapes.
    published: [AtomicU64; 4],
    /// Set when the drain starts: `/readyz` answers 503 and new upgrades are refused, while
    /// open clients keep receiving until their turn to be closed.
    pub(crate) draining: AtomicBool,
    /// Set once the drain is over; publishes are refused from then on.
    pub(crate) shutting_down: AtomicBool,
    /// The bus to the other nodes (`--bus`); `None` for a standalone node. Publish hands it
    /// every message that did not come from it, after local delivery; shards tell it when a
    /// topic's interest entry appears or goes.
    pub(crate) bus: Option<Arc<Bus>>,
}

/// A cheap, cloneable handle on a running relay: publish server-side and read counters.
#[derive(Clone)]
pub struct Relay {
    pub(crate) shared: Arc<Shared>,
}

/// A connection's place on its shard, returned by [`Relay::reserve`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    pub(crate) shard: usize,
    pub(crate) key: usize,
    pub(crate) id: u64,
}

/// Counters summed over every shard at the moment of asking.
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
    /// Messages accepted from embedders calling [`Relay::publish`].
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
    /// Frames pushed onto client queues.
    pub deliveries: u64,
    /// Disconnects, by reason.
    pub disconnects: crate::DisconnectCounts,
    /// Refused requests, by reason.
    pub rejections: crate::RejectionCounts,
    /// The bus's counters; `None` for a standalone node.
    pub bus: Option<BusStats>,
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
            disconnects: crate::DisconnectCounts::default(),
            rejections: crate::RejectionCounts::default(),
            bus: None,
        }
    }
}

/// Where a message entered the publish function (the `source` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Ws = 0,
    Http = 1,
    Api = 2,
    /// Another node, through the bus: delivered locally, never sent back to the bus.
    Bus = 3,
}

/// A WebSocket connection's admission: its share of `--max-connections` and of
/// `--max-connections-per-ip`. The shard holds it until the client is freed; dropping it
/// gives both back.
#[derive(Debug)]
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    _ip: Option<IpSlot>,
}

/// One connection's count in [`Shared::per_ip`].
#[derive(Debug)]
struct IpSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        // The entry exists: this slot's count is in it (see `Shared::per_ip`).
        self.shared.per_ip.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Relay {
    pub(crate) fn new(
        config: Config,
        auth: Auth,
        shards: Vec<mpsc::Sender<ShardMsg>>,
        bus: Option<Arc<Bus>>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(
            config.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        Self {
            shared: Arc::new(Shared {
                config,
                shards,
                interest: DashMap::new(),
                next_shard: AtomicUsize::new(0),
                next_conn_id: AtomicU64::new(1),
                permits,
                per_ip: DashMap::new(),
                auth,
                rejections: Rejections::default(),
                published: Default::default(),
                draining: AtomicBool::new(false),
                shutting_down: AtomicBool::new(false),
                bus,
            }),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Publishes `payload` to every subscriber of `topic`. This is the single publish function
    /// every source goes through: the frame is encoded once here and each shard that has a
    /// subscriber receives a refcounted clone of it.
    ///
    /// Refuses a payload over `max_message_bytes`. Returns the number of local shards the
    /// message was queued to. Messages published by one task reach each subscriber in the
    /// order of the calls. With `--bus`, the message then goes to the other nodes too.
    pub async fn publish(
        &self,
        topic: &Topic,
        opcode: Opcode,
        payload: &[u8],
    ) -> Result<usize, Error> {
        self.publish_from(Source::Api, topic, opcode, payload).await
    }

    /// [`Relay::publish`], counted under `source`: local delivery first, then, unless the
    /// message came from the bus, the bus. Local delivery never waits for the broker: it is
    /// done before the bus is asked. Handing to the bus waits only while its queue is full,
    /// at most `CONGESTION_WAIT` (100 ms) per stall (`Bus::send`), then drops and counts.
    pub(crate) async fn publish_from(
        &self,
        source: Source,
        topic: &Topic,
        opcode: Opcode,
        payload: &[u8],
    ) -> Result<usize, Error> {
        let queued = self.deliver(source, topic, opcode, payload).await?;
        if source != Source::Bus
            && let Some(bus) = &self.shared.bus
        {
            bus.send(topic, opcode, payload).await;
        }
        Ok(queued)
    }

    /// Delivers to this node's subscribers only.
    async fn deliver(
        &self,
        source: Source,
        topic: &Topic,
        opcode: Opcode,
        payload: &[u8],
    ) -> Result<usize, Error> {
        if self.shared.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let max = self.shared.config.max_message_bytes;
        if payload.len() > max {
            // Larger than a client may send, and possibly larger than a send queue: refusing
            // it here keeps one oversized publish from dropping every subscriber as slow.
            return Err(Error::MessageTooLarge {
                size: payload.len(),
                max,
            });
        }
        self.shared.published[source as usize].fetch_add(1, Ordering::Relaxed);
        // Copy the set out: no dashmap guard may be held across an await.
        let Some(set) = self.shared.interest.get(topic).map(|s| *s) else {
            return Ok(0);
        };
        let at = tokio::time::Instant::now();
        let frame = frame::encode(opcode, payload);
        let mut queued = 0;
        for i in set.iter() {
            let msg = ShardMsg::Publish {
                topic: topic.clone(),
                frame: Bytes::clone(&frame),
                at,
            };
            if self.shared.shards[i].send(msg).await.is_err() {
                return Err(Error::ShuttingDown);
            }
            queued += 1;
        }
        Ok(queued)
    }

    /// Admits one more WebSocket connection from `ip`, or says which limit refuses it.
    pub(crate) fn try_admit(&self, ip: IpAddr) -> Result<Admission, RejectReason> {
        let permit = Arc::clone(&self.shared.permits)
            .try_acquire_owned()
            .map_err(|_| RejectReason::ConnectionLimit)?;
        let ip_slot = match self.shared.config.max_connections_per_ip {
            None => None,
            Some(max) => {
                // `max >= 1` (validated), so a refused address always has an entry already.
                let mut n = self.shared.per_ip.entry(ip).or_insert(0);
                if *n as usize >= max {
                    return Err(RejectReason::PerIpLimit);
                }
                *n += 1;
                drop(n);
                Some(IpSlot {
                    shared: Arc::clone(&self.shared),
                    ip,
                })
            }
        };
        Ok(Admission {
            _permit: permit,
            _ip: ip_slot,
        })
    }

    /// Whether the drain has started (`/readyz` answers 503 from then on).
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Counts a refused request.
    pub(crate) fn reject(&self, why: RejectReason) {
        self.shared.rejections.record(why);
    }

    /// WebSocket connections currently counted for `ip` (0 without a per-address limit).
    pub fn connections_from(&self, ip: IpAddr) -> usize {
        self.shared.per_ip.get(&ip).map_or(0, |n| *n as usize)
    }

    /// Places a new connection on a shard and subscribes it to `topics` before returning, so
    /// every message published after the handshake response reaches it. With a bus, that
    /// includes messages published on other nodes: it also waits (at most a second) for the
    /// node's broker subscriptions.
    pub(crate) async fn reserve(
        &self,
        topics: Box<[Topic]>,
        conn: Arc<crate::shard::ConnShared>,
        admission: Admission,
    ) -> Result<Slot, Error> {
        if self.is_draining() {
            return Err(Error::ShuttingDown);
        }
        // With a bus, the topics are needed again after the shard has them (see below).
        let bus_topics = self.shared.bus.as_ref().map(|_| topics.clone());
        let shard =
            self.shared.next_shard.fetch_add(1, Ordering::Relaxed) % self.shared.shards.len();
        let id = self.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let msg = ShardMsg::Reserve {
            id,
            topics,
            conn,
            admission,
            reply,
        };
        self.shared.shards[shard]
            .send(msg)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let key = rx.await.map_err(|_| Error::ShuttingDown)?;
        if let (Some(bus), Some(topics)) = (&self.shared.bus, bus_topics) {
            // Hold the 101 until the node is subscribed on the broker (a few ms for a topic
            // new to this node), so messages published on other nodes after the handshake
            // reach this client too. Bounded, and skipped while the broker is away.
            bus.wait_subscribed(&topics, crate::bus::SUBSCRIBE_WAIT)
                .await;
        }
        Ok(Slot { shard, key, id })
    }

    /// Sends a connection's message to its shard. Fails only once the shard has stopped.
    pub(crate) async fn to_shard(&self, shard: usize, msg: ShardMsg) -> Result<(), Error> {
        self.shared.shards[shard]
            .send(msg)
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// Sums the counters of every shard. Shards that have stopped are left out.
    pub async fn stats(&self) -> Stats {
        let published = |s: Source| self.shared.published[s as usize].load(Ordering::Relaxed);
        let mut total = Stats {
            rejections: self.shared.rejections.snapshot(),
            published_ws: published(Source::Ws),
            published_http: published(Source::Http),
            published_api: published(Source::Api),
            published_bus: published(Source::Bus),
            bus: self.shared.bus.as_ref().map(|b| b.stats()),
            topics: self.shared.interest.len(),
            ..Stats::default()
        };
        for tx in &self.shared.shards {
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

    /// Number of topics with at least one subscriber on this node.
    pub fn topics(&self) -> usize {
        self.shared.interest.len()
    }

    /// Whether this node is subscribed to `topic` on the bus (false without `--bus`). Once
    /// it is, messages published to `topic` on other nodes reach this node's subscribers.
    pub fn bus_subscribed(&self, topic: &Topic) -> bool {
        self.shared
            .bus
            .as_ref()
            .is_some_and(|b| b.is_subscribed(topic))
    }

    /// Whether this node has a working bus session (false without `--bus`).
    pub fn bus_connected(&self) -> bool {
        self.shared.bus.as_ref().is_some_and(|b| b.is_connected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_set_round_trips() {
        let mut s = ShardSet::default();
        assert!(s.is_empty());
        for i in [0, 63, 64, 255] {
            s.insert(i);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 255]);
        s.remove(63);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 64, 255]);
    }
}
