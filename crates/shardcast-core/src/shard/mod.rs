//! A hub shard: the task that alone owns a share of the clients, their send queues, its
//! `topic -> clients` index and its timer wheel. Reading client sockets lives in `conn.rs`;
//! choosing shards and encoding frames live in `engine.rs` and `frame.rs`.
//!
//! The shard never awaits a socket. After each batch of inbox messages it flushes every client
//! the batch touched with non-blocking vectored writes (one `writev` carries up to 1024
//! frames, so a batch usually costs one syscall per client) and, when the kernel buffer is
//! full, parks a readiness future for that client and moves on. A flush round yields between
//! slices of clients and takes the publishes made meanwhile, unless the queues are deep.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use indexmap::IndexSet;
use slab::Slab;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use crate::engine::{Guard, Inner};
use crate::frame::{self, close_code};
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
/// Most frames handed to one `writev`: Linux's `UIO_MAXIOV`. A client that fell behind gets
/// its backlog in a few large writes rather than many small ones, which is what lets a shard
/// catch up (per write, the kernel's cost is mostly fixed).
const MAX_IOV: usize = 1024;
/// Frames up to which the slices for a `writev` live on the stack; more take one allocation.
const STACK_IOV: usize = 64;
/// How long a close frame may take to flush after a slow-consumer, pong-timeout or
/// protocol-error close before the socket is closed anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
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

/// A drain in progress: the clients still to close and the pace to close them at.
struct Drain {
    /// Clients open when the drain began, still to be closed (some may have left since).
    pending: Vec<(usize, u64)>,
    total: usize,
    start: Instant,
    until: Instant,
    deadline: Instant,
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

#[derive(Debug, Clone, Copy)]
enum TimerKind {
    /// Send a heartbeat ping.
    Ping,
    /// The pong deadline of the last ping.
    PongDeadline,
    /// Check whether a blocked write has made progress.
    WriteCheck,
    /// A close has had its time; free the client.
    CloseDeadline,
}

#[derive(Debug, Clone, Copy)]
struct Timer {
    key: usize,
    id: u64,
    kind: TimerKind,
}

enum Phase {
    Open,
    /// A close frame is queued. The client is out of every topic.
    Closing {
        why: DisconnectReason,
        reader_gone: bool,
        write_shut: bool,
    },
}

/// One client as its shard sees it.
///
/// Invariants: `queued` is the sum of the lengths of `queue`'s frames; `queued` never exceeds
/// the send budget except by the close frame queued when a close starts; `head_partial` is true
/// only while the front frame has been partly written.
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

enum Flush {
    Drained,
    Blocked,
}

impl Client {
    /// Writes as much of the queue as the kernel takes, `MAX_IOV` frames per syscall, and adds
    /// the bytes written to `sent`.
    fn write_some(&mut self, sent: &mut u64) -> io::Result<Flush> {
        let Some(stream) = self.stream.as_ref() else {
            return Ok(Flush::Blocked);
        };
        self.recent_peak = self.recent_peak.max(self.queue.len());
        while let Some(front) = self.queue.front() {
            let result = if self.queue.len() == 1 {
                // The common case at a steady rate: one frame, a plain `write`.
                stream.try_write(front)
            } else if self.queue.len() <= STACK_IOV {
                let mut iov = [IoSlice::new(&[]); STACK_IOV];
                let mut n = 0;
                for (slot, frame) in iov.iter_mut().zip(self.queue.iter()) {
                    *slot = IoSlice::new(frame);
                    n += 1;
                }
                stream.try_write_vectored(&iov[..n])
            } else {
                // A backlog: one allocation for up to `MAX_IOV` frames in one syscall.
                let iov: Vec<IoSlice<'_>> = self
                    .queue
                    .iter()
                    .take(MAX_IOV)
                    .map(|frame| IoSlice::new(frame))
                    .collect();
                stream.try_write_vectored(&iov)
            };
            let mut written = match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) => return Err(e),
            };
            self.queued -= written;
            *sent += written as u64;
            while written > 0 {
                // The kernel never reports more bytes than the slices held.
                let Some(front) = self.queue.front_mut() else {
                    break;
                };
                if front.len() <= written {
                    written -= front.len();
                    self.queue.pop_front();
                    self.head_partial = false;
                } else {
                    front.advance(written);
                    self.head_partial = true;
                    written = 0;
                }
            }
        }
        let capacity = self.queue.capacity();
        if capacity > 64 && self.recent_peak < capacity / 4 {
            // Hand back a burst's worth of slots once they go mostly unused: idle clients
            // hold no large buffers (an idle client's next ping drains with a peak of 1).
            self.queue = VecDeque::new();
        }
        self.recent_peak = 0;
        Ok(Flush::Drained)
    }

    fn push(&mut self, frame: Bytes) {
        self.queued += frame.len();
        self.queue.push_back(frame);
    }

    fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }
}

type Waiter = Pin<Box<dyn Future<Output = (usize, u64)> + Send>>;

pub(crate) struct Shard {
    index: usize,
    engine: Arc<Inner>,
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
    pub(crate) fn new(index: usize, engine: Arc<Inner>) -> Self {
        let c = &engine.config;
        let shortest = c
            .ping_interval
            .min(c.pong_timeout)
            .min(c.write_timeout)
            .min(CLOSE_GRACE);
        let tick = (shortest / 8).clamp(Duration::from_millis(1), Duration::from_millis(100));
        let budget = c.send_queue_bytes;
        Self {
            index,
            engine,
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
                    if let Some(c) = self.client_mut(key, id) {
                        c.waiting_writable = false;
                        self.flush(key);
                    }
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

    fn now_tick(&self) -> u64 {
        (self.start.elapsed().as_nanos() / self.tick.as_nanos().max(1)) as u64
    }

    fn ticks(&self, d: Duration) -> u64 {
        (d.as_nanos().div_ceil(self.tick.as_nanos().max(1))) as u64
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
                if reply.send(key).is_err() {
                    // The handshake was abandoned before it finished.
                    self.finalize(key, DisconnectReason::ClientClose);
                }
            }
            ShardMsg::Attach { key, id, stream } => {
                let now = self.now_tick();
                let ping_at = now + self.ticks(self.engine.config.ping_interval);
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
            ShardMsg::Drain { until, deadline } => {
                self.draining = true;
                let pending: Vec<(usize, u64)> = self
                    .clients
                    .iter()
                    .filter(|(_, c)| c.is_open())
                    .map(|(k, c)| (k, c.id))
                    .collect();
                self.drain = Some(Drain {
                    total: pending.len(),
                    pending,
                    start: Instant::now(),
                    until,
                    deadline,
                });
                self.drain_step();
            }
            ShardMsg::Shutdown => self.shutdown(),
        }
    }

    /// Closes the share of the drain that is due by now: by time `t`, the fraction
    /// `(t - start) / (until - start)` of the clients. Called on the message and every tick.
    fn drain_step(&mut self) {
        let Some(d) = &mut self.drain else {
            return;
        };
        let now = Instant::now();
        let due = if now >= d.until {
            d.total
        } else {
            let done = (now - d.start).as_secs_f64() / (d.until - d.start).as_secs_f64();
            (d.total as f64 * done).ceil() as usize
        };
        let closed = d.total - d.pending.len();
        let take = due.saturating_sub(closed).min(d.pending.len());
        let batch = d.pending.split_off(d.pending.len() - take);
        let grace = d.deadline.saturating_duration_since(now);
        if d.pending.is_empty() {
            self.drain = None;
        }
        for (key, id) in batch {
            if self.client_mut(key, id).is_some() {
                self.going_away(key, grace);
            }
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

    fn doom(&mut self, key: usize) {
        let c = &mut self.clients[key];
        if !c.doomed {
            c.doomed = true;
            self.doomed.push(key);
        }
    }

    /// After a batch: drop the slow consumers it found, then flush every client it touched.
    fn end_batch(&mut self) {
        self.close_doomed();
        self.flush_dirty(usize::MAX);
    }

    /// Starts closing the slow consumers found since the last call.
    fn close_doomed(&mut self) {
        while let Some(key) = self.doomed.pop() {
            if self.clients.contains(key) {
                self.clients[key].doomed = false;
                tracing::debug!(shard = self.index, key, "dropping slow consumer");
                self.begin_close(
                    key,
                    close_code::SLOW_CONSUMER,
                    "slow consumer",
                    DisconnectReason::SlowConsumer,
                    CLOSE_GRACE,
                );
            }
        }
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
        let write_timeout = self.ticks(self.engine.config.write_timeout);
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

    /// Starts closing a client: out of every topic, queue the close frame, and give it `grace`
    /// to flush. A slow consumer's backlog is discarded first (except a half-written frame,
    /// which must be finished for the close frame to be readable).
    fn begin_close(
        &mut self,
        key: usize,
        code: u16,
        reason: &str,
        why: DisconnectReason,
        grace: Duration,
    ) {
        let deadline = self.now_tick() + self.ticks(grace);
        let c = &mut self.clients[key];
        if !c.is_open() {
            return;
        }
        c.conn.closing.store(true, Ordering::Release);
        c.phase = Phase::Closing {
            why,
            reader_gone: false,
            write_shut: false,
        };
        // Counted when the reason is decided; `finalize` counts only clients never closed.
        self.disconnects.record(why);
        let c = &mut self.clients[key];
        if why == DisconnectReason::SlowConsumer {
            let keep = usize::from(c.head_partial);
            c.queue.truncate(keep);
            c.queued = c.queue.iter().map(Bytes::len).sum();
        }
        let id = c.id;
        let attached = c.stream.is_some();
        c.push(frame::close(code, reason));
        let topics = c.topics.clone();
        for topic in topics.iter() {
            self.unsubscribe(topic, key);
        }
        if !attached {
            self.finalize(key, why);
            return;
        }
        self.wheel.schedule(
            deadline,
            Timer {
                key,
                id,
                kind: TimerKind::CloseDeadline,
            },
        );
        // Every caller ends its batch with `end_batch`, which flushes dirty clients.
        self.mark_dirty(key);
    }

    /// Called when a closing client's queue (ending in the close frame) has been written.
    fn close_progress(&mut self, key: usize) {
        let c = &mut self.clients[key];
        let Phase::Closing {
            why,
            reader_gone,
            write_shut,
        } = &mut c.phase
        else {
            return;
        };
        if *reader_gone {
            let why = *why;
            self.finalize(key, why);
            return;
        }
        if !*write_shut {
            *write_shut = true;
            if let Some(s) = &c.stream {
                // Half-close: the client sees our FIN after the close frame and can answer.
                s.shutdown(Shutdown::Write);
            }
        }
    }

    /// Frees a client: its topics, its queue, its socket and its admission.
    fn finalize(&mut self, key: usize, why: DisconnectReason) {
        let Some(c) = self.clients.try_remove(key) else {
            return;
        };
        if c.is_open() {
            for topic in c.topics.iter() {
                self.unsubscribe(topic, key);
            }
            self.disconnects.record(why);
        }
        c.conn.closing.store(true, Ordering::Release);
        if let Some(s) = &c.stream {
            // Wakes the reader with end-of-file if it is still waiting.
            s.shutdown(Shutdown::Both);
        }
        tracing::debug!(
            shard = self.index,
            key,
            id = c.id,
            reason = why.as_str(),
            "client freed"
        );
    }

    fn subscribe(&mut self, topic: &Topic, key: usize) {
        let subs = self.topics.entry(topic.clone()).or_default();
        if subs.is_empty() {
            self.engine.interest.join(topic, self.index);
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
            self.engine.interest.leave(topic, self.index);
        }
    }

    fn on_tick(&mut self) {
        let now = self.now_tick();
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(now, &mut fired);
        let c = &self.engine.config;
        let (ping_every, pong_within, write_timeout) = (
            self.ticks(c.ping_interval),
            self.ticks(c.pong_timeout),
            self.ticks(c.write_timeout),
        );
        for Timer { key, id, kind } in fired.drain(..) {
            let Some(c) = self.client_mut(key, id) else {
                continue;
            };
            let open = c.is_open();
            match kind {
                TimerKind::Ping if open => {
                    c.conn.alive.store(false, Ordering::Relaxed);
                    self.wheel.schedule(
                        now + pong_within,
                        Timer {
                            key,
                            id,
                            kind: TimerKind::PongDeadline,
                        },
                    );
                    self.enqueue_control(key, frame::ping());
                }
                TimerKind::PongDeadline if open => {
                    if c.conn.alive.load(Ordering::Relaxed) {
                        let next = (now + ping_every).saturating_sub(pong_within);
                        self.wheel.schedule(
                            next,
                            Timer {
                                key,
                                id,
                                kind: TimerKind::Ping,
                            },
                        );
                    } else {
                        tracing::debug!(shard = self.index, key, "pong timeout");
                        self.begin_close(
                            key,
                            close_code::PONG_TIMEOUT,
                            "pong timeout",
                            DisconnectReason::PongTimeout,
                            CLOSE_GRACE,
                        );
                    }
                }
                TimerKind::WriteCheck => match c.stalled_since {
                    Some(since) if now >= since + write_timeout => {
                        let why = if open {
                            DisconnectReason::WriteTimeout
                        } else {
                            closing_reason(c)
                        };
                        tracing::debug!(shard = self.index, key, "write timeout");
                        self.finalize(key, why);
                    }
                    Some(since) => self
                        .wheel
                        .schedule(since + write_timeout, Timer { key, id, kind }),
                    None => c.write_check_pending = false,
                },
                TimerKind::CloseDeadline => {
                    let why = closing_reason(c);
                    self.finalize(key, why);
                }
                _ => {}
            }
        }
        self.fired = fired;
        self.drain_step();
        self.end_batch();
    }

    /// Closes a client for the shutdown (1001), keeping its backlog ahead of the close frame.
    fn going_away(&mut self, key: usize, grace: Duration) {
        self.begin_close(
            key,
            close_code::GOING_AWAY,
            "going away",
            DisconnectReason::Shutdown,
            grace,
        );
    }

    /// Closes every open client with 1001 at once, each with the short close grace. Also
    /// ends a drain in progress.
    fn shutdown(&mut self) {
        self.draining = true;
        self.drain = None;
        let keys: Vec<usize> = self.clients.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.going_away(key, CLOSE_GRACE);
        }
        self.end_batch();
    }
}

fn closing_reason(c: &Client) -> DisconnectReason {
    match c.phase {
        Phase::Closing { why, .. } => why,
        Phase::Open => DisconnectReason::ClientClose,
    }
}

/// A handle on `frame` whose reference count belongs to this shard alone: every other shard
/// clones and drops the same frame at the same moment, and one shared count would bounce its
/// cache line between their cores once per subscriber (`benches/engine.rs`,
/// `shard_fanout_two_shards`). The payload is not copied: the new handle owns the old one.
fn shard_handle(frame: Bytes) -> Bytes {
    Bytes::from_owner(frame)
}

/// One shard with `k` subscribers of one topic and no sockets, for measuring the in-process
/// cost of fan-out (`benches/engine.rs`). Not part of the API (feature `internals`).
#[cfg(feature = "internals")]
pub struct FanoutFixture {
    shard: Shard,
    topic: Topic,
    frame: Bytes,
    /// Keeps the shard's inbox open; nothing reads it.
    _inbox: Vec<mpsc::Receiver<ShardMsg>>,
    /// The reservations' answers, kept so the shard sees the handshakes as still waiting.
    _replies: Vec<oneshot::Receiver<usize>>,
}

#[cfg(feature = "internals")]
impl FanoutFixture {
    /// `k` subscribers, each with a send budget large enough for `burst` frames of
    /// `payload` bytes between two [`FanoutFixture::drain`] calls.
    pub fn new(k: usize, payload: usize, burst: usize) -> Self {
        let frame = frame::encode(crate::Opcode::Binary, &vec![7u8; payload]);
        let config = crate::EngineConfig {
            shards: 1,
            send_queue_bytes: (frame.len() * burst).max(1 << 20),
            ..crate::EngineConfig::default()
        };
        let (engine, inbox) = crate::Engine::without_shards(config);
        let mut shard = Shard::new(0, Arc::clone(engine.inner()));
        let topic = Topic::new("bench").expect("a valid topic");
        let mut replies = Vec::with_capacity(k);
        for id in 0..k as u64 {
            let (reply, rx) = oneshot::channel();
            replies.push(rx);
            shard.handle(ShardMsg::Reserve {
                id,
                topics: Box::new([topic.clone()]),
                conn: Arc::new(ConnShared::default()),
                guard: Box::new(()),
                reply,
            });
        }
        Self {
            shard,
            topic,
            frame,
            _inbox: inbox,
            _replies: replies,
        }
    }

    /// Pushes one frame onto every subscriber's queue: what a shard does per publish.
    pub fn publish(&mut self) {
        self.shard
            .fan_out(&self.topic, &shard_handle(self.frame.clone()));
    }

    /// As [`FanoutFixture::publish`], with `frame` (shared with other threads).
    /// `own_handle: false` skips the shard's own handle, as the shard did before it had one.
    pub fn publish_frame(&mut self, frame: &Bytes, own_handle: bool) {
        if own_handle {
            self.shard
                .fan_out(&self.topic, &shard_handle(frame.clone()));
        } else {
            self.shard.fan_out(&self.topic, frame);
        }
    }

    /// The frame [`FanoutFixture::publish`] sends.
    pub fn frame(&self) -> Bytes {
        self.frame.clone()
    }

    /// Empties every queue, as writing them to sockets would.
    pub fn drain(&mut self) {
        for (_, c) in self.shard.clients.iter_mut() {
            c.queue.clear();
            c.queued = 0;
            c.dirty = false;
        }
        self.shard.dirty.clear();
    }

    /// Frames delivered so far.
    pub fn deliveries(&self) -> u64 {
        self.shard.deliveries
    }
}
