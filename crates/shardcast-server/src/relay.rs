//! [`Relay`], the server's handle on a running node: the publish function every source goes
//! through (the engine's local delivery, then the bus), admission against the connection
//! limits, the refusal counters and [`Stats`]. Per-shard client state lives in the engine;
//! the broker sessions in `bus/`.

use std::net::IpAddr;
use std::ops::Deref;
use std::sync::Arc;

use dashmap::DashMap;
use shardcast_core::{ConnShared, Engine, Opcode, Slot, Source, Topic};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::Auth;
use crate::bus::{self, Bus, BusStats};
use crate::reject::{RejectReason, RejectionCounts, Rejections};
use crate::{Config, Error};

/// State shared by the accept loop, the HTTP handlers and the readers.
struct Shared {
    config: Config,
    engine: Engine,
    /// One permit per WebSocket connection, held by the shard until the client is freed.
    permits: Arc<Semaphore>,
    /// WebSocket connections per client address, kept only with `--max-connections-per-ip`.
    ///
    /// Invariant: an address's count is the number of live [`IpSlot`]s for it; the slot that
    /// takes the count to zero removes the entry, so the map never holds an address with no
    /// connection. Touched once per connection (admit and free), never per message.
    per_ip: Arc<DashMap<IpAddr, u32>>,
    /// Credentials and origin rules, parsed once at start.
    auth: Auth,
    /// Refused requests by reason.
    rejections: Rejections,
    /// The bus to the other nodes (`--bus`); `None` for a standalone node. Publish hands it
    /// every message that did not come from it, after local delivery.
    bus: Option<Arc<Bus>>,
    /// Serve the browser demo at `/` (decided once at start: `demo::enabled`).
    demo: bool,
}

/// A cheap, cloneable handle on a running relay: publish server-side and read counters.
#[derive(Clone)]
pub struct Relay {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").finish_non_exhaustive()
    }
}

/// Counters of the whole node at the moment of asking: the engine's (reachable directly
/// through `Deref`, as `stats.connections`), the refusals and the bus's.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stats {
    pub engine: shardcast_core::Stats,
    /// Refused requests, by reason.
    pub rejections: RejectionCounts,
    /// The bus's counters; `None` for a standalone node.
    pub bus: Option<BusStats>,
    /// Whether `/readyz` answers 200 (false once the drain has started).
    pub ready: bool,
    /// `--max-connections`.
    pub max_connections: usize,
    /// The process's descriptors and memory; `None` where `/proc` cannot be read.
    pub process: Option<crate::process::Process>,
    /// The JWKS fetches; `None` without `--jwt-jwks-url`.
    pub jwks: Option<crate::JwksStats>,
    /// Tasks alive on the runtime that took the scrape (readers, shards, the bus, hyper's
    /// connections...); `None` outside a runtime. A soak test watches it return to baseline.
    pub tokio_tasks: Option<u64>,
}

impl Deref for Stats {
    type Target = shardcast_core::Stats;

    fn deref(&self) -> &Self::Target {
        &self.engine
    }
}

/// A WebSocket connection's admission: its share of `--max-connections` and of
/// `--max-connections-per-ip`. The shard holds it (as the engine's `Guard`) until the
/// client is freed; dropping it gives both back.
#[derive(Debug)]
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    _ip: Option<IpSlot>,
}

/// One connection's count in [`Shared::per_ip`].
#[derive(Debug)]
struct IpSlot {
    per_ip: Arc<DashMap<IpAddr, u32>>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        // The entry exists: this slot's count is in it (see `Shared::per_ip`).
        self.per_ip.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

impl Relay {
    pub(crate) fn new(
        config: Config,
        auth: Auth,
        engine: Engine,
        bus: Option<Arc<Bus>>,
        demo: bool,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(
            config.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        Self {
            shared: Arc::new(Shared {
                config,
                engine,
                permits,
                per_ip: Arc::default(),
                auth,
                rejections: Rejections::default(),
                bus,
                demo,
            }),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    pub(crate) fn auth(&self) -> &Auth {
        &self.shared.auth
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    /// Whether `/` serves the browser demo.
    pub(crate) fn serves_demo(&self) -> bool {
        self.shared.demo
    }

    /// Publishes `payload` to every subscriber of `topic`. This is the single publish function
    /// every source goes through: the frame is encoded once and each shard that has a
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

    /// [`Relay::publish`], counted under `source`: local delivery first, then the bus. Local
    /// delivery never waits for the broker: it is done before the bus is asked. Handing to
    /// the bus waits only while its queue is full, at most `CONGESTION_WAIT` (100 ms) per
    /// stall (`Bus::send`), then drops and counts. Messages from the bus do not come this
    /// way: the bus delivers them with the engine's publish, so they never go back to it.
    pub(crate) async fn publish_from(
        &self,
        source: Source,
        topic: &Topic,
        opcode: Opcode,
        payload: &[u8],
    ) -> Result<usize, Error> {
        debug_assert_ne!(source, Source::Bus, "the bus delivers through the engine");
        let queued = self
            .shared
            .engine
            .publish(source, topic, opcode, payload)
            .await?;
        if let Some(bus) = &self.shared.bus {
            bus.send(topic, opcode, payload).await;
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
                    per_ip: Arc::clone(&self.shared.per_ip),
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
        self.shared.engine.is_draining()
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
    /// node's broker subscriptions. At `expires` (its token's end) the shard closes the
    /// connection with 4010.
    pub(crate) async fn reserve(
        &self,
        topics: Box<[Topic]>,
        conn: Arc<ConnShared>,
        admission: Admission,
        expires: Option<tokio::time::Instant>,
    ) -> Result<Slot, Error> {
        // With a bus, the topics are needed again after the shard has them (see below).
        let bus_topics = self.shared.bus.as_ref().map(|_| topics.clone());
        let slot = self
            .shared
            .engine
            .reserve(topics, conn, Box::new(admission), expires)
            .await?;
        if let (Some(bus), Some(topics)) = (&self.shared.bus, bus_topics) {
            // Hold the 101 until the node is subscribed on the broker (a few ms for a topic
            // new to this node), so messages published on other nodes after the handshake
            // reach this client too. Bounded, and skipped while the broker is away.
            bus.wait_subscribed(&topics, bus::SUBSCRIBE_WAIT).await;
        }
        Ok(slot)
    }

    /// Sums the counters of every shard, with the refusals and the bus's.
    pub async fn stats(&self) -> Stats {
        Stats {
            engine: self.shared.engine.stats().await,
            rejections: self.shared.rejections.snapshot(),
            bus: self.shared.bus.as_ref().map(|b| b.stats()),
            ready: !self.is_draining(),
            max_connections: self.shared.config.max_connections,
            process: crate::process::Process::read(),
            jwks: self.shared.auth.jwks_stats(),
            tokio_tasks: tokio::runtime::Handle::try_current()
                .ok()
                .map(|h| h.metrics().num_alive_tasks() as u64),
        }
    }

    /// Number of topics with at least one subscriber on this node.
    pub fn topics(&self) -> usize {
        self.shared.engine.interest().len()
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
