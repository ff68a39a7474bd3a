//! A hub shard: the task that alone owns a share of the clients, their send queues, its
//! `topic -> clients` index and its timer wheel. This file holds the shard's state, its run
//! loop, its message handler, fan-out and flushing. Its parts live beside it: the per-client
//! send queue in `queue.rs`, closes and slow consumers in `lifecycle.rs`, timers, the drain
//! and shutdown in `timers.rs`, the bench fixtures in `fixture.rs`, the unit tests in
//! `tests.rs`. Reading client sockets lives in the server crate; choosing shards and encoding
//! frames live in `engine.rs` and `frame.rs`.
//!
//! The shard never awaits a socket. After each batch of inbox messages it flushes every client
//! the batch touched with non-blocking vectored writes (one `writev` carries up to 1024
//! frames, so a batch usually costs one syscall per client) and, when the kernel buffer is
//! full, parks a readiness future for that client and moves on. A flush round yields between
//! slices of clients and takes the publishes made meanwhile, unless the queues are deep.

mod lifecycle;
mod queue;
mod timers;

#[cfg(feature = "internals")]
mod fixture;
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
use indexmap::IndexSet;
use slab::Slab;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

#[cfg(feature = "internals")]
pub use self::fixture::{FanoutFixture, SocketFixture};
use self::lifecycle::{CLOSE_GRACE, Phase, closing_reason};
use self::queue::Flush;
use self::timers::{Drain, Timer, TimerKind};
use crate::config::EngineConfig;
use crate::interest::Interest;
use crate::socket::Socket;
use crate::stats::{FANOUT_BOUNDS, Histogram, QUEUE_BOUNDS};
use crate::wheel::TimerWheel;
use crate::{DisconnectCounts, DisconnectReason, Topic};

/// Inbox messages a shard handles before it flushes the clients they touched.
const BATCH: usize = 256;
/// Clients a shard flushes before it lets the other tasks on its thread run and takes the
/// publishes they made meanwhile (see `Shard::flush_round`).
const FLUSH_SLICE: usize = 256;
/// Frames per client above which a flush round stops taking publishes mid-round: the shard is
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
/// Invariants: `queued` is the sum of the lengths of `queue`'s frames; `queued` never exceeds
/// the send budget except by the close frame queued when a close starts; `head_partial` is true
/// only while the front frame has been partly written.
///
/// The send queue's fields (`queue`, `recent_peak`, `queued`, `head_partial`) are written
/// only by `queue.rs` (and the bench fixture's `drain`). They stay flat in `Client`: a nested
/// struct's padding would grow `Client` from 128 to 136 bytes, and fan-out to 100k clients
/// with it.
struct Client {
    id: u64,
    /// `None` until the HTTP upgrade completes; frames queue up meanwhile.
    stream: Option<Arc<Socket>>,
    conn: Arc<ConnShared>,
    topics: Box<[Topic]>,
    queue: VecDeque<Bytes>,
    /// The most frames `queue` held at the start of a write since it was last drained.
    /// A drained queue keeps its slots while the previous burst used a good share of them,
    /// so a client that gets hundreds of frames per flush does not reallocate its queue
    /// from empty every flush; it is freed once a drain finds it mostly unused.
    recent_peak: usize,
    queued: usize,
    head_partial: bool,
    /// Already in the shard's dirty list.
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
    /// Local subscribers of each topic (slab keys). Invariant: a topic has an entry iff the set
    /// is non-empty, iff this shard's bit is set in the engine's interest map.
    topics: HashMap<Topic, IndexSet<usize>>,
    wheel: TimerWheel<Timer>,
    fired: Vec<Timer>,
    writable: FuturesUnordered<Waiter>,
    /// Clients with something to write, in the order they will be flushed. Invariant: a
    /// client is in it iff its `dirty` flag is set (a key freed and reused while queued may
    /// appear twice; flushing it twice is harmless).
    dirty: VecDeque<usize>,
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
            topics: HashMap::new(),
            wheel: TimerWheel::new(1024),
            fired: Vec::new(),
            writable: FuturesUnordered::new(),
            dirty: VecDeque::new(),
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
                // Clients that got frames after this round had flushed them: the next round.
                _ = std::future::ready(()), if !self.dirty.is_empty() => {
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

    /// Handles what waits in the inbox, up to `BATCH` messages in all (`handled` so far). Once
    /// the inbox is empty, yields once so publishers running beside the shard can add to this
    /// batch: each client is then written once for several frames instead of once per frame.
    async fn collect(&mut self, inbox: &mut mpsc::Receiver<ShardMsg>, mut handled: usize) {
        let mut yielded = false;
        while handled < BATCH {
            match inbox.try_recv() {
                Ok(msg) => {
                    self.handle(msg);
                    handled += 1;
                }
                Err(_) if !yielded && !self.dirty.is_empty() => {
                    yielded = true;
                    tokio::task::yield_now().await;
                }
                Err(_) => break,
            }
        }
    }

    /// One flush round: closes the slow consumers found so far, then flushes the clients that
    /// are dirty now, `FLUSH_SLICE` at a time. Between slices it yields, so the readers on
    /// this thread run, and handles what they published meanwhile: a frame published
    /// mid-round joins the queues of the clients the round has not reached yet and goes out
    /// in this round's write to them, instead of waiting for the round to end. The clients
    /// already flushed get it in the next round. With 10,000 subscribers on one core a round
    /// takes tens of milliseconds, so this about halves the time a frame waits. A round
    /// flushes at most the clients dirty at its start, so a steady stream of publishes cannot
    /// keep it from returning to the timers and the writable futures.
    async fn flush_round(&mut self, inbox: &mut mpsc::Receiver<ShardMsg>) {
        self.close_doomed();
        let mut left = self.dirty.len();
        let (mut flushed, mut frames) = (0, 0);
        loop {
            let slice = left.min(FLUSH_SLICE);
            frames += self.flush_dirty(slice);
            flushed += slice;
            left -= slice;
            if left == 0 || self.dirty.is_empty() {
                break;
            }
            if frames > flushed * DEEP_QUEUE {
                // Deep queues: the shard is behind, and throughput, not latency, is what
                // counts. Frames taken mid-round would only lengthen the queues this round
                // has yet to write (and the round with them), so finish it as one batch.
                self.flush_dirty(left);
                break;
            }
            tokio::task::yield_now().await;
            for _ in 0..BATCH {
                match inbox.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                }
            }
            self.close_doomed();
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
            ShardMsg::Publish { topic, frame, at } => {
                self.fan_out(&topic, &shard_handle(frame));
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
                    topics: topics.clone(),
                    queue: VecDeque::new(),
                    queued: 0,
                    head_partial: false,
                    recent_peak: 0,
                    dirty: false,
                    doomed: false,
                    waiting_writable: false,
                    stalled_since: None,
                    write_check_pending: false,
                    phase: Phase::Open,
                    _guard: guard,
                });
                self.opened += 1;
                for topic in topics.iter() {
                    self.subscribe(topic, key);
                }
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
                        (c.queue.is_empty() || c.stream.is_none()).then_some(*why)
                    }
                };
                if let Some(why) = free_now {
                    self.finalize(key, why);
                }
            }
            ShardMsg::Stats(reply) => {
                let mut send_queue = Histogram::new(QUEUE_BOUNDS);
                for (_, c) in self.clients.iter() {
                    send_queue.observe(c.queued as f64);
                }
                let _ = reply.send(ShardStats {
                    connections: self.clients.len(),
                    opened: self.opened,
                    bytes_sent: self.bytes_sent,
                    queued_bytes: self.clients.iter().map(|(_, c)| c.queued).sum(),
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

    /// Pushes one encoded frame onto the queue of every local subscriber of `topic`.
    /// Per subscriber: a refcount increment and a queue slot; no copy and no lock. The only
    /// syscall is for a client already at its budget, which gets one write before it is judged.
    fn fan_out(&mut self, topic: &Topic, frame: &Bytes) {
        let Some(subs) = self.topics.get(topic) else {
            return;
        };
        let len = frame.len();
        for &key in subs {
            let c = &mut self.clients[key];
            if c.doomed {
                continue;
            }
            if c.queued + len > self.budget {
                // Give the kernel a chance first: a fast client in a burst is not slow.
                if c.write_some(&mut self.bytes_sent).is_err() || c.queued + len > self.budget {
                    c.doomed = true;
                    self.doomed.push(key);
                    continue;
                }
            }
            c.push(Bytes::clone(frame));
            self.peak_client_queued = self.peak_client_queued.max(c.queued);
            self.deliveries += 1;
            if !c.dirty {
                c.dirty = true;
                self.dirty.push_back(key);
            }
        }
    }

    /// Queues a ping or pong. Control frames count against the budget like any other.
    fn enqueue_control(&mut self, key: usize, frame: Bytes) {
        let c = &mut self.clients[key];
        // As in `fan_out`: one write attempt before a client at its budget is judged slow.
        let full = |c: &Client| c.queued + frame.len() > self.budget;
        if full(c) && (c.write_some(&mut self.bytes_sent).is_err() || full(c)) {
            self.doom(key);
        } else {
            c.push(frame);
            self.mark_dirty(key);
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        let c = &mut self.clients[key];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push_back(key);
        }
    }

    /// After a batch: drop the slow consumers it found, then flush every client it touched.
    fn end_batch(&mut self) {
        self.close_doomed();
        self.flush_dirty(usize::MAX);
    }

    /// Flushes up to `n` clients from the front of the dirty queue.
    /// Returns how many frames those clients held when their flush began.
    fn flush_dirty(&mut self, n: usize) -> usize {
        let mut frames = 0;
        for _ in 0..n {
            let Some(key) = self.dirty.pop_front() else {
                break;
            };
            if let Some(c) = self.clients.get_mut(key) {
                c.dirty = false;
                frames += c.queue.len();
                self.flush(key);
            }
        }
        frames
    }

    /// Writes what the client has queued; parks a readiness future if the kernel is full.
    fn flush(&mut self, key: usize) {
        let now = self.now_tick();
        let write_timeout = self.ticks(self.config.write_timeout);
        let c = &mut self.clients[key];
        if c.stream.is_none() {
            return;
        }
        let before = c.queued;
        match c.write_some(&mut self.bytes_sent) {
            Ok(Flush::Drained) => {
                c.stalled_since = None;
                if !c.is_open() {
                    self.close_progress(key);
                }
            }
            Ok(Flush::Blocked) => {
                let id = c.id;
                let first_stall = c.stalled_since.is_none();
                if first_stall || c.queued < before {
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

    fn subscribe(&mut self, topic: &Topic, key: usize) {
        let subs = self.topics.entry(topic.clone()).or_default();
        if subs.is_empty() {
            self.interest.join(topic, self.index);
        }
        subs.insert(key);
    }

    fn unsubscribe(&mut self, topic: &Topic, key: usize) {
        let Some(subs) = self.topics.get_mut(topic) else {
            return;
        };
        subs.swap_remove(&key);
        if subs.is_empty() {
            self.topics.remove(topic);
            self.interest.leave(topic, self.index);
        }
    }
}

/// A handle on `frame` whose reference count belongs to this shard alone: every other shard
/// clones and drops the same frame at the same moment, and one shared count would bounce its
/// cache line between their cores once per subscriber (`benches/engine.rs`,
/// `shard_fanout_two_shards`). The payload is not copied: the new handle owns the old one.
fn shard_handle(frame: Bytes) -> Bytes {
    Bytes::from_owner(frame)
}
