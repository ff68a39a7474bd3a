//! A hub shard: the task that alone owns a share of the clients, the topic rings they read
//! from, its `topic -> rings` index and its timer wheel. This file holds the shard's state,
//! its run loop, its message handler, fan-out and flushing. Its parts live beside it: the
//! rings and each client's outbox in `ring.rs`, the write loop in `queue.rs`, closes and slow
//! consumers in `lifecycle.rs`, timers, the drain and shutdown in `timers.rs`, the bench
//! fixtures in `fixture.rs`, the unit tests in `tests.rs`. Reading client sockets lives in the
//! server crate; choosing shards and encoding frames live in `engine.rs` and `frame.rs`.
//!
//! A publish appends its frame once to each ring whose topic set contains the topic; a
//! client is a cursor into its ring. The shard never awaits a socket. After each batch of
//! inbox messages it visits the subscribers of every ring the batch appended to and hands
//! each its backlog in one non-blocking write, whatever the number of frames; when the
//! kernel buffer is full it parks a readiness future for that client and moves on. A flush
//! round yields between slices of clients and takes the publishes made meanwhile, unless
//! the rings are deep.

mod lifecycle;
mod queue;
mod ring;
mod timers;

#[cfg(feature = "internals")]
mod fixture;
#[cfg(any(test, feature = "internals"))]
mod ring_model;
#[cfg(test)]
mod ring_tests;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use slab::Slab;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

#[cfg(feature = "internals")]
pub use self::fixture::{FanoutFixture, SocketFixture};
use self::lifecycle::{CLOSE_GRACE, Phase, closing_reason};
use self::queue::Flush;
use self::ring::{Outbox, Ring};
#[cfg(feature = "internals")]
pub use self::ring_model::{RingModel, RingOp};
use self::timers::{Drain, Timer, TimerKind};
use crate::config::EngineConfig;
use crate::interest::Interest;
use crate::socket::Socket;
use crate::stats::{FANOUT_BOUNDS, Histogram, QUEUE_BOUNDS};
use crate::wheel::TimerWheel;
use crate::{DisconnectCounts, DisconnectReason, Topic};

/// Inbox messages a shard handles before it flushes the clients they touched.
const BATCH: usize = 256;
/// Most yields a batch waits for publishes that keep coming (see `Shard::collect`).
const YIELDS: usize = 8;
/// Clients a shard flushes before it lets the other tasks on its thread run and takes the
/// publishes they made meanwhile (see `Shard::flush_round`).
const FLUSH_SLICE: usize = 256;
/// Frames in a ring above which a flush round stops taking publishes mid-round: the shard is
/// behind (see `Shard::flush_round`).
const DEEP_QUEUE: usize = 64;
/// Capacity of each shard's inbox.
pub(crate) const INBOX: usize = 1024;

/// State a connection's reader and its shard both touch.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// Set by the reader on every read that returned bytes; cleared by the shard when it sends
    /// a heartbeat ping. Still clear at the pong deadline means the client is gone.
    pub(crate) alive: AtomicBool,
    /// Set by the shard once it starts closing the connection; the reader then publishes
    /// nothing more.
    pub(crate) closing: AtomicBool,
}

impl ConnShared {
    /// The reader saw bytes from the client: it is alive, whatever they were.
    pub fn mark_alive(&self) {
        self.alive.store(true, Ordering::Relaxed);
    }

    /// Whether the shard has started closing the connection (the reader then publishes
    /// nothing more).
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// What the shard does when it begins a close, for harnesses that stand in for it.
    #[cfg(feature = "internals")]
    pub fn begin_closing(&self) {
        self.closing.store(true, Ordering::Release);
    }
}

/// Something the shard holds for a connection until it frees it, then drops: the server's
/// admission (its share of the connection limits).
pub type Guard = Box<dyn Send + 'static>;

/// Messages a shard receives. Connection messages carry `(key, id)`; a message whose id does
/// not match the client in that slot is stale and ignored.
pub enum ShardMsg {
    Publish {
        topic: Topic,
        frame: Bytes,
        /// The id of a connection that must not receive it (the publisher, when it asks).
        skip: Option<u64>,
        /// When the publish function took the message, for `publish_fanout_seconds`.
        at: Instant,
    },
    Reserve {
        id: u64,
        topics: Box<[Topic]>,
        conn: Arc<ConnShared>,
        guard: Guard,
        /// When to close the client with 4010 (its token's expiry); `None`: never.
        expires: Option<Instant>,
        reply: oneshot::Sender<usize>,
    },
    Attach {
        key: usize,
        id: u64,
        stream: Arc<Socket>,
    },
    /// A control reply (pong) for the client.
    Control {
        key: usize,
        id: u64,
        frame: Bytes,
    },
    /// Close the client with this code: a protocol error, or the echo of the client's close.
    Close {
        key: usize,
        id: u64,
        code: u16,
        reason: &'static str,
        why: DisconnectReason,
    },
    /// The client's reader has stopped.
    Gone {
        key: usize,
        id: u64,
    },
    Stats(oneshot::Sender<ShardStats>),
    /// Close every client with 1001, spread evenly until `until`; each close may take until
    /// `deadline`, when whatever is left is dropped.
    Drain {
        until: Instant,
        deadline: Instant,
    },
    /// Close every client with 1001 now, with the short close grace.
    Shutdown,
}

#[derive(Debug)]
pub struct ShardStats {
    pub(crate) connections: usize,
    pub(crate) opened: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) queued_bytes: usize,
    pub(crate) peak_client_queued_bytes: usize,
    pub(crate) deliveries: u64,
    pub(crate) disconnects: DisconnectCounts,
    pub(crate) send_queue: Histogram,
    pub(crate) publish_fanout: Histogram,
}

/// One client as its shard sees it.
///
/// Invariants: while the client is open, `ring` names the ring of its topic set, it is in
/// that ring's `subs` at `sub_index`, and `out.cursor` is a position in that ring; once a
/// close has begun, `ring` is `None` and everything it still has to write is in
/// `out.side`. Its unsent bytes (`Outbox::unsent`) never exceed the send budget for longer
/// than the batch that finds it over, except by the close frame queued when a close starts.
struct Client {
    id: u64,
    /// `None` until the HTTP upgrade completes; the backlog waits in the ring meanwhile.
    stream: Option<Arc<Socket>>,
    conn: Arc<ConnShared>,
    /// Key of the client's ring in `Shard::rings` while it is open.
    ring: Option<u32>,
    sub_index: u32,
    out: Outbox,
    /// Already in the shard's list of clients to flush.
    dirty: bool,
    /// Over budget during the current batch; dropped as a slow consumer after it.
    doomed: bool,
    /// A writable-readiness future is parked for this client.
    waiting_writable: bool,
    /// Tick of the last write progress while bytes were waiting, if a write check is pending.
    stalled_since: Option<u64>,
    /// A `WriteCheck` entry is in the wheel. At most one per client, however often it stalls.
    write_check_pending: bool,
    phase: Phase,
    /// The server's admission: dropped when the client is freed.
    _guard: Guard,
}

type Waiter = Pin<Box<dyn Future<Output = (usize, u64)> + Send>>;

pub(crate) struct Shard {
    index: usize,
    config: EngineConfig,
    /// The node's interest map: this shard writes only its own bit (see `Interest`).
    interest: Arc<Interest>,
    clients: Slab<Client>,
    /// One ring per distinct topic set of this shard's open clients (see `ring.rs`). A ring
    /// exists iff it has a subscriber.
    rings: Slab<Ring>,
    /// The ring of each topic set (sorted, without duplicates).
    ring_of: HashMap<Box<[Topic]>, u32>,
    /// The rings each topic's publishes go to. Invariant: a topic has an entry iff the list
    /// is non-empty, iff this shard's bit is set in the engine's interest map.
    topics: HashMap<Topic, Vec<u32>>,
    wheel: TimerWheel<Timer>,
    fired: Vec<Timer>,
    writable: FuturesUnordered<Waiter>,
    /// Clients with something of their own to write (side frames, a close, a new socket),
    /// in the order they will be flushed. Invariant: a client is in it iff its `dirty` flag
    /// is set (a key freed and reused while queued may appear twice; flushing it twice is
    /// harmless).
    dirty: VecDeque<usize>,
    /// Rings with frames their subscribers may not have written yet. Invariant: a ring is in
    /// it iff its `dirty` flag is set (as for `dirty`, a reused key may appear twice).
    dirty_rings: VecDeque<u32>,
    /// Rings whose head passed their budget mark during this batch (`Ring::check_at`).
    checks: Vec<u32>,
    doomed: Vec<usize>,
    start: Instant,
    tick: Duration,
    budget: usize,
    /// No new clients; the shard stops once it has none.
    draining: bool,
    drain: Option<Drain>,
    inbox_closed: bool,
    peak_client_queued: usize,
    // Plain counters, read by `ShardMsg::Stats`: no atomic is touched per delivery.
    deliveries: u64,
    opened: u64,
    bytes_sent: u64,
    disconnects: DisconnectCounts,
    publish_fanout: Histogram,
}

impl Shard {
    pub(crate) fn new(index: usize, config: EngineConfig, interest: Arc<Interest>) -> Self {
        let c = &config;
        let shortest = c
            .ping_interval
            .min(c.pong_timeout)
            .min(c.write_timeout)
            .min(CLOSE_GRACE);
        let tick = (shortest / 8).clamp(Duration::from_millis(1), Duration::from_millis(100));
        let budget = c.send_queue_bytes;
        Self {
            index,
            config,
            interest,
            clients: Slab::new(),
            rings: Slab::new(),
            ring_of: HashMap::new(),
            topics: HashMap::new(),
            wheel: TimerWheel::new(1024),
            fired: Vec::new(),
            writable: FuturesUnordered::new(),
            dirty: VecDeque::new(),
            dirty_rings: VecDeque::new(),
            checks: Vec::new(),
            doomed: Vec::new(),
            start: Instant::now(),
            tick,
            budget,
            draining: false,
            drain: None,
            inbox_closed: false,
            peak_client_queued: 0,
            deliveries: 0,
            opened: 0,
            bytes_sent: 0,
            disconnects: DisconnectCounts::default(),
            publish_fanout: Histogram::new(FANOUT_BOUNDS),
        }
    }

    /// Runs until shutdown has closed every client (or the drain deadline freed them).
    pub(crate) async fn run(mut self, mut inbox: mpsc::Receiver<ShardMsg>) {
        let mut interval = tokio::time::interval(self.tick);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if self.draining && self.clients.is_empty() {
                break;
            }
            tokio::select! {
                msg = inbox.recv(), if !self.inbox_closed => {
                    let Some(msg) = msg else {
                        self.inbox_closed = true;
                        self.shutdown();
                        continue;
                    };
                    self.handle(msg);
                    self.collect(&mut inbox, 1).await;
                    self.flush_round(&mut inbox).await;
                }
                // Frames that came after this round had flushed their clients: the next round.
                _ = std::future::ready(()), if self.has_dirty() => {
                    self.collect(&mut inbox, 0).await;
                    self.flush_round(&mut inbox).await;
                }
                Some((key, id)) = self.writable.next(), if !self.writable.is_empty() => {
                    self.on_writable(key, id);
                }
                _ = interval.tick() => self.on_tick(),
            }
        }
        tracing::debug!(shard = self.index, "shard stopped");
    }

    fn has_dirty(&self) -> bool {
        !self.dirty.is_empty() || !self.dirty_rings.is_empty()
    }

    /// Handles what waits in the inbox, up to `BATCH` messages in all (`handled` so far). Once
    /// the inbox is empty, yields so publishers running beside the shard can add to this
    /// batch, and again while a yield brought more (at most `YIELDS` times): each client is
    /// then written once for several frames instead of once per frame. Messages that arrive
    /// over a few event-loop turns (a chat room's clients all answering one message) join
    /// one batch; a lone message costs one yield that brings nothing.
    async fn collect(&mut self, inbox: &mut mpsc::Receiver<ShardMsg>, mut handled: usize) {
        let mut yields = 0;
        loop {
            let before = handled;
            while handled < BATCH {
                match inbox.try_recv() {
                    Ok(msg) => {
                        self.handle(msg);
                        handled += 1;
                    }
                    Err(_) => break,
                }
            }
            let dry = yields > 0 && handled == before;
            if dry || handled >= BATCH || yields == YIELDS || !self.has_dirty() {
                break;
            }
            yields += 1;
            tokio::task::yield_now().await;
        }
    }

    /// One flush round: closes the slow consumers found so far, flushes the clients with
    /// frames of their own, then the subscribers of every ring that is dirty now,
    /// `FLUSH_SLICE` at a time. Between slices it yields, so the readers on this thread run,
    /// and handles what they published meanwhile: a frame appended mid-round reaches the
    /// subscribers the round has not visited yet in this round's write to them, instead of
    /// waiting for the round to end; the ones already visited get it in the next round. With
    /// 10,000 subscribers on one core a round takes milliseconds, so this about halves the
    /// time a frame waits. A round visits at most the rings dirty at its start, so a steady
    /// stream of publishes cannot keep it from returning to the timers and writable futures.
    async fn flush_round(&mut self, inbox: &mut mpsc::Receiver<ShardMsg>) {
        self.close_doomed();
        self.flush_dirty(self.dirty.len());
        for _ in 0..self.dirty_rings.len() {
            let Some(r) = self.dirty_rings.pop_front() else {
                break;
            };
            let Some(ring) = self.rings.get_mut(r as usize) else {
                continue;
            };
            ring.dirty = false;
            let mut next = 0;
            loop {
                next = self.flush_ring(r, next, FLUSH_SLICE);
                let Some(ring) = self.rings.get(r as usize) else {
                    break;
                };
                if next >= ring.subs.len() {
                    break;
                }
                if ring.frames() > DEEP_QUEUE {
                    // A deep backlog: the shard is behind, and throughput, not latency, is
                    // what counts. Frames taken mid-round would only lengthen the writes
                    // this round has yet to make (and the round with them): no yield.
                    continue;
                }
                tokio::task::yield_now().await;
                for _ in 0..BATCH {
                    match inbox.try_recv() {
                        Ok(msg) => self.handle(msg),
                        Err(_) => break,
                    }
                }
                self.close_doomed();
                self.flush_dirty(self.dirty.len());
            }
        }
    }

    /// Flushes up to `n` subscribers of ring `r` from position `from` of its list, skipping
    /// those with nothing to write or a readiness future parked. Returns the position to go
    /// on from.
    fn flush_ring(&mut self, r: u32, from: usize, n: usize) -> usize {
        let mut i = from;
        let end = from.saturating_add(n);
        while i < end {
            let Some(ring) = self.rings.get(r as usize) else {
                return usize::MAX;
            };
            let Some(&key) = ring.subs.get(i) else {
                return i;
            };
            let head = ring.head();
            let c = &self.clients[key];
            let idle = c.out.cursor == head && c.out.side.is_empty();
            if idle || c.waiting_writable || c.doomed || c.stream.is_none() {
                i += 1;
                continue;
            }
            self.flush(key);
            // A client freed by a failed write was swapped out of the list: the one that
            // took its place is visited next.
            let same = self.rings.get(r as usize).and_then(|r| r.subs.get(i)) == Some(&key);
            if same {
                i += 1;
            }
        }
        i
    }

    /// Flushes every dirty client and ring at once, with no yield (timers, shutdown).
    fn end_batch(&mut self) {
        self.close_doomed();
        self.flush_dirty(usize::MAX);
        while let Some(r) = self.dirty_rings.pop_front() {
            if let Some(ring) = self.rings.get_mut(r as usize) {
                ring.dirty = false;
                self.flush_ring(r, 0, usize::MAX);
            }
        }
    }

    /// A parked readiness future completed: flushes the client again, if it is still there.
    fn on_writable(&mut self, key: usize, id: u64) {
        if let Some(c) = self.client_mut(key, id) {
            c.waiting_writable = false;
            self.flush(key);
        }
    }

    fn client_mut(&mut self, key: usize, id: u64) -> Option<&mut Client> {
        self.clients.get_mut(key).filter(|c| c.id == id)
    }

    fn handle(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Publish {
                topic,
                frame,
                skip,
                at,
            } => {
                self.fan_out(&topic, &frame, skip);
                self.publish_fanout.observe(at.elapsed().as_secs_f64());
            }
            ShardMsg::Reserve {
                id,
                topics,
                conn,
                guard,
                expires,
                reply,
            } => {
                if self.draining {
                    return; // dropping `reply` tells the handler to answer 503
                }
                let key = self.clients.insert(Client {
                    id,
                    stream: None,
                    conn,
                    ring: None,
                    sub_index: 0,
                    out: Outbox::default(),
                    dirty: false,
                    doomed: false,
                    waiting_writable: false,
                    stalled_since: None,
                    write_check_pending: false,
                    phase: Phase::Open,
                    _guard: guard,
                });
                self.opened += 1;
                self.join_ring(key, topics);
                if let Some(at) = expires {
                    // Kept in the wheel, not in `Client`: most clients never need it.
                    let kind = TimerKind::Expiry;
                    self.wheel
                        .schedule(self.tick_of(at), Timer { key, id, kind });
                }
                if reply.send(key).is_err() {
                    // The handshake was abandoned before it finished.
                    self.finalize(key, DisconnectReason::ClientClose);
                }
            }
            ShardMsg::Attach { key, id, stream } => {
                let now = self.now_tick();
                let ping_at = now + self.ticks(self.config.ping_interval);
                let Some(c) = self.client_mut(key, id) else {
                    // Freed while the upgrade was finishing (shutdown, or a slow consumer
                    // before it had a socket). End the reader the upgrade is about to start.
                    stream.shutdown(Shutdown::Both);
                    return;
                };
                c.stream = Some(stream);
                let open = c.is_open();
                if open {
                    self.wheel.schedule(
                        ping_at,
                        Timer {
                            key,
                            id,
                            kind: TimerKind::Ping,
                        },
                    );
                }
                self.mark_dirty(key);
            }
            ShardMsg::Control { key, id, frame } => {
                if self.client_mut(key, id).is_some_and(|c| c.is_open()) {
                    self.enqueue_control(key, frame);
                }
            }
            ShardMsg::Close {
                key,
                id,
                code,
                reason,
                why,
            } => {
                if self.client_mut(key, id).is_some() {
                    self.begin_close(key, code, reason, why, CLOSE_GRACE);
                }
            }
            ShardMsg::Gone { key, id } => {
                let Some(c) = self.client_mut(key, id) else {
                    return;
                };
                let free_now = match &mut c.phase {
                    Phase::Open => Some(DisconnectReason::ClientClose),
                    Phase::Closing {
                        why, reader_gone, ..
                    } => {
                        *reader_gone = true;
                        (c.out.side.is_empty() || c.stream.is_none()).then_some(*why)
                    }
                };
                if let Some(why) = free_now {
                    self.finalize(key, why);
                }
            }
            ShardMsg::Stats(reply) => {
                let mut send_queue = Histogram::new(QUEUE_BOUNDS);
                let mut queued_bytes = 0;
                for (_, c) in self.clients.iter() {
                    let unsent = c.out.unsent(self.ring_of_client(c));
                    send_queue.observe(unsent as f64);
                    queued_bytes += unsent;
                }
                let _ = reply.send(ShardStats {
                    connections: self.clients.len(),
                    opened: self.opened,
                    bytes_sent: self.bytes_sent,
                    queued_bytes,
                    peak_client_queued_bytes: self.peak_client_queued,
                    deliveries: self.deliveries,
                    disconnects: self.disconnects.clone(),
                    send_queue,
                    publish_fanout: self.publish_fanout.clone(),
                });
            }
            ShardMsg::Drain { until, deadline } => self.drain(until, deadline),
            ShardMsg::Shutdown => self.shutdown(),
        }
    }

    fn ring_of_client(&self, c: &Client) -> Option<&Ring> {
        c.ring.and_then(|r| self.rings.get(r as usize))
    }

    /// Appends one encoded frame to the ring of every topic set that contains `topic`: one
    /// copy per ring, whatever the number of subscribers, and no per-subscriber work. `skip`:
    /// the id of a client that must not receive it. Rings whose head passed their budget
    /// mark have their subscribers checked (`check_ring`).
    fn fan_out(&mut self, topic: &Topic, frame: &[u8], skip: Option<u64>) {
        let Some(rings) = self.topics.get(topic) else {
            return;
        };
        for &r in rings {
            let ring = &mut self.rings[r as usize];
            if ring.append(frame, skip) {
                self.checks.push(r);
            }
            self.deliveries += ring.subs.len() as u64;
            if !ring.dirty {
                ring.dirty = true;
                self.dirty_rings.push_back(r);
            }
        }
        while let Some(r) = self.checks.pop() {
            self.check_ring(r);
        }
    }

    /// Finds the subscribers of ring `r` whose unsent bytes passed the budget, dooms them
    /// (each gets one write first: a fast client in a burst is not slow), trims the ring to
    /// its oldest cursor and sets the mark at which the next check is due: the first head at
    /// which any survivor could pass the budget. Costs one pass over the subscribers, once
    /// per budget's worth of bytes the slowest of them falls behind.
    fn check_ring(&mut self, r: u32) {
        let budget = self.budget as u64;
        let Shard {
            clients,
            rings,
            bytes_sent,
            doomed,
            peak_client_queued,
            ..
        } = self;
        let Some(ring) = rings.get_mut(r as usize) else {
            return;
        };
        let mut oldest = ring.head();
        let mut mark = u64::MAX;
        let mut i = 0;
        while let Some(&key) = ring.subs.get(i) {
            i += 1;
            let c = &mut clients[key];
            if !c.doomed && c.out.unsent(Some(ring)) as u64 > budget {
                let failed = c.write_some(Some(ring), bytes_sent).is_err();
                if failed || c.out.unsent(Some(ring)) as u64 > budget {
                    c.doomed = true;
                    doomed.push(key);
                }
            }
            oldest = oldest.min(c.out.cursor);
            if !c.doomed {
                // A doomed client's backlog is over the budget by design: it never goes out.
                *peak_client_queued = (*peak_client_queued).max(c.out.unsent(Some(ring)));
                let at = (c.out.cursor + budget).saturating_sub(c.out.side_bytes as u64);
                mark = mark.min(at);
            }
        }
        ring.trim(oldest);
        ring.check_at = mark.min(ring.head() + budget);
    }

    /// Queues a ping or pong in the client's side queue. Control frames count against the
    /// budget like any other.
    fn enqueue_control(&mut self, key: usize, frame: Bytes) {
        let budget = self.budget;
        let c = &mut self.clients[key];
        let mut ring = c.ring.and_then(|r| self.rings.get_mut(r as usize));
        // As in `check_ring`: one write attempt before a client at its budget is judged slow.
        let full = |c: &Client, ring: Option<&Ring>| c.out.unsent(ring) + frame.len() > budget;
        if full(c, ring.as_deref())
            && (c
                .write_some(ring.as_deref_mut(), &mut self.bytes_sent)
                .is_err()
                || full(c, ring.as_deref()))
        {
            self.doom(key);
            return;
        }
        c.out.push_side(frame);
        if let Some(ring) = ring {
            let at = (c.out.cursor + budget as u64).saturating_sub(c.out.side_bytes as u64);
            ring.check_at = ring.check_at.min(at);
        }
        self.mark_dirty(key);
    }

    fn mark_dirty(&mut self, key: usize) {
        let c = &mut self.clients[key];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push_back(key);
        }
    }

    fn mark_ring_dirty(&mut self, r: u32) {
        let ring = &mut self.rings[r as usize];
        if !ring.dirty {
            ring.dirty = true;
            self.dirty_rings.push_back(r);
        }
    }

    /// Flushes up to `n` clients from the front of the dirty list.
    fn flush_dirty(&mut self, n: usize) {
        for _ in 0..n {
            let Some(key) = self.dirty.pop_front() else {
                break;
            };
            if let Some(c) = self.clients.get_mut(key) {
                c.dirty = false;
                self.flush(key);
            }
        }
    }

    /// Writes what the client has to write; parks a readiness future if the kernel is full.
    fn flush(&mut self, key: usize) {
        let c = &mut self.clients[key];
        if c.stream.is_none() {
            return;
        }
        let mut ring = c.ring.and_then(|r| self.rings.get_mut(r as usize));
        let before = c.out.unsent(ring.as_deref());
        if !c.doomed {
            self.peak_client_queued = self.peak_client_queued.max(before);
        }
        let result = c.write_some(ring.as_deref_mut(), &mut self.bytes_sent);
        let progress = c.out.unsent(ring.as_deref()) < before;
        match result {
            Ok(Flush::Drained) => {
                c.stalled_since = None;
                if !c.is_open() {
                    self.close_progress(key);
                }
            }
            Ok(Flush::Blocked) => {
                // The clock is read only here: a flush that drains (the common case, once
                // per subscriber per round) needs no time.
                let now = self.now_tick();
                let write_timeout = self.ticks(self.config.write_timeout);
                let c = &mut self.clients[key];
                let id = c.id;
                let first_stall = c.stalled_since.is_none();
                if first_stall || progress {
                    c.stalled_since = Some(now);
                }
                if !c.write_check_pending {
                    c.write_check_pending = true;
                    self.wheel.schedule(
                        now + write_timeout,
                        Timer {
                            key,
                            id,
                            kind: TimerKind::WriteCheck,
                        },
                    );
                }
                if !c.waiting_writable {
                    c.waiting_writable = true;
                    // `stream` is Some: checked above.
                    let stream = c.stream.clone();
                    self.writable.push(Box::pin(async move {
                        if let Some(s) = stream {
                            let _ = s.writable().await;
                        }
                        (key, id)
                    }));
                }
            }
            Err(e) => {
                tracing::debug!(shard = self.index, key, error = %e, "write failed");
                let why = if c.is_open() {
                    DisconnectReason::ClientClose
                } else {
                    closing_reason(c)
                };
                self.finalize(key, why);
            }
        }
    }

    /// Subscribes a new client to `topics`: it becomes a cursor at the head of the ring of
    /// that topic set, made now if no client of this shard has the same set.
    fn join_ring(&mut self, key: usize, topics: Box<[Topic]>) {
        let mut set = topics.into_vec();
        set.sort();
        set.dedup();
        let set = set.into_boxed_slice();
        let r = match self.ring_of.get(&set) {
            Some(&r) => r,
            None => {
                let ring = Ring::new(set.clone(), self.budget);
                let r = u32::try_from(self.rings.insert(ring))
                    .expect("fewer than 2^32 rings per shard");
                for topic in set.iter() {
                    let list = self.topics.entry(topic.clone()).or_default();
                    if list.is_empty() {
                        self.interest.join(topic, self.index);
                    }
                    list.push(r);
                }
                self.ring_of.insert(set, r);
                r
            }
        };
        let (cursor, index) = self.rings[r as usize].join(key);
        let c = &mut self.clients[key];
        c.ring = Some(r);
        c.sub_index = index;
        c.out.cursor = cursor;
    }

    /// Takes a client off its ring (its backlog must have been moved out first if it is
    /// still to be written). The last subscriber of a ring removes it, and a topic's last
    /// ring its entry.
    fn leave_ring(&mut self, key: usize) {
        let c = &mut self.clients[key];
        let Some(r) = c.ring.take() else {
            return;
        };
        let (index, cursor) = (c.sub_index, c.out.cursor);
        let ring = &mut self.rings[r as usize];
        if let Some(moved) = ring.leave(index, cursor) {
            self.clients[moved].sub_index = index;
        }
        if !ring.subs.is_empty() {
            if ring.is_behind() {
                // A subscriber moved to this client's place may have been passed over by a
                // flush in progress: the next round visits the ring again.
                self.mark_ring_dirty(r);
            }
            return;
        }
        let ring = self.rings.remove(r as usize);
        for topic in ring.topics.iter() {
            if let Some(list) = self.topics.get_mut(topic) {
                list.retain(|&x| x != r);
                if list.is_empty() {
                    self.topics.remove(topic);
                    self.interest.leave(topic, self.index);
                }
            }
        }
        self.ring_of.remove(&ring.topics);
    }
}
