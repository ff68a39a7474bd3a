//! Unit tests that drive one shard directly: its message handler and `on_tick`, on tokio's
//! paused clock, with real socket pairs. Each client's far end is a plain non-blocking std
//! socket the test reads itself, so what a client would see is what is asserted.
//!
//! No test sleeps or sets a tokio timer: the clock moves only by `tokio::time::advance`, and
//! every wait is a bounded number of rounds, each of which lets the I/O driver look at the
//! sockets once (`Harness::pump`). What does not live here: end-to-end tests through the
//! server (`tests/` at the top of the workspace).

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, advance};

use super::{CLOSE_GRACE, ConnShared, Shard, ShardMsg, ShardStats};
use crate::frame::{self, close_code};
use crate::socket::Socket;
use crate::{DisconnectReason, Engine, EngineConfig, Opcode, Topic};

/// Rounds a bounded wait may take before the test fails. A round is one look of the I/O
/// driver at the sockets; a local socket answers in one or two.
const ROUNDS: usize = 10_000;
/// Kernel buffer asked for on a client that should block (the kernel doubles it and counts
/// its own overhead in it, so a few frames of `PAYLOAD` fill it).
const SMALL_BUFFER: usize = 4096;
/// Payload of the data frames the tests publish; the first 8 bytes are a sequence number.
const PAYLOAD: usize = 1000;

/// What a client that got nothing has read.
const NOTHING: [Frame; 0] = [];

/// A frame as the client end reads it.
#[derive(Debug, PartialEq)]
enum Frame {
    Data(u64),
    Ping,
    Close(u16),
}

/// One shard, built and driven by hand, with the engine it belongs to.
struct Harness {
    shard: Shard,
    engine: Engine,
    /// The shard's inbox, kept open; the tests hand messages to `Shard::handle` instead.
    _inbox: Vec<mpsc::Receiver<ShardMsg>>,
    topic: Topic,
    next_id: u64,
    published: u64,
}

/// The client end of one connection.
struct Peer {
    key: usize,
    id: u64,
    conn: Arc<ConnShared>,
    sock: StdUnixStream,
    /// Bytes read and not yet parsed into a frame.
    unparsed: Vec<u8>,
    /// Frames read so far.
    frames: Vec<Frame>,
    eof: bool,
    /// A clone of the admission guard the shard holds: the shard has freed the client once
    /// this is the only one left.
    admission: Arc<()>,
}

impl Harness {
    fn new(config: EngineConfig) -> Self {
        let (engine, inbox) = Engine::without_shards(EngineConfig {
            shards: 1,
            ..config
        });
        let shard = engine.shard(0);
        Self {
            shard,
            engine,
            _inbox: inbox,
            topic: Topic::new("t").expect("a valid topic"),
            next_id: 1,
            published: 0,
        }
    }

    /// What the run loop does after a batch of messages: drop the slow consumers, flush.
    fn handle(&mut self, msg: ShardMsg) {
        self.shard.handle(msg);
        self.shard.end_batch();
    }

    /// Reserves a client for the test topic and attaches a socket to it. `small` gives the
    /// socket a small kernel buffer, so it fills once the client stops reading.
    async fn connect(&mut self, small: bool) -> Peer {
        self.connect_until(small, None).await
    }

    /// `connect`, with an expiry: the shard closes the client with 4010 at `expires`.
    async fn connect_until(&mut self, small: bool, expires: Option<Instant>) -> Peer {
        let topics = Box::new([self.topic.clone()]);
        self.connect_with(small, expires, topics).await
    }

    /// A client subscribed to `topics` (a default socket, no expiry).
    async fn connect_to(&mut self, topics: &[&str]) -> Peer {
        let topics = topics
            .iter()
            .map(|t| Topic::new(t).expect("a valid topic"))
            .collect();
        self.connect_with(false, None, topics).await
    }

    async fn connect_with(
        &mut self,
        small: bool,
        expires: Option<Instant>,
        topics: Box<[Topic]>,
    ) -> Peer {
        let id = self.next_id;
        self.next_id += 1;
        let conn = Arc::new(ConnShared::default());
        let admission = Arc::new(());
        let (reply, mut answer) = oneshot::channel();
        self.shard.handle(ShardMsg::Reserve {
            id,
            topics,
            conn: Arc::clone(&conn),
            guard: Box::new(Arc::clone(&admission)),
            expires,
            reply,
        });
        let key = answer
            .try_recv()
            .expect("the shard answers a reservation at once");
        let (stream, sock) = socket_pair(small).await;
        self.handle(ShardMsg::Attach { key, id, stream });
        Peer {
            key,
            id,
            conn,
            sock,
            unparsed: Vec::new(),
            frames: Vec::new(),
            eof: false,
            admission,
        }
    }

    /// Publishes the next numbered frame to the test topic.
    fn publish(&mut self) {
        self.publish_batch(1);
    }

    /// Publishes `n` numbered frames in one batch: the shard flushes once, after the last.
    fn publish_batch(&mut self, n: usize) {
        for _ in 0..n {
            let mut payload = vec![0u8; PAYLOAD];
            payload[..8].copy_from_slice(&self.published.to_be_bytes());
            self.published += 1;
            self.shard.handle(ShardMsg::Publish {
                topic: self.topic.clone(),
                frame: frame::encode(Opcode::Binary, &payload),
                skip: None,
                at: Instant::now(),
            });
        }
        self.shard.end_batch();
    }

    /// Publishes the next numbered frame to `topic`, not to the client `skip` (its id), and
    /// flushes.
    fn publish_to(&mut self, topic: &str, skip: Option<u64>) {
        let mut payload = vec![0u8; PAYLOAD];
        payload[..8].copy_from_slice(&self.published.to_be_bytes());
        self.published += 1;
        self.handle(ShardMsg::Publish {
            topic: Topic::new(topic).expect("a valid topic"),
            frame: frame::encode(Opcode::Binary, &payload),
            skip,
            at: Instant::now(),
        });
    }

    /// Publishes until `done`, at most `limit` frames.
    fn publish_until(&mut self, limit: usize, mut done: impl FnMut(&mut Self) -> bool) {
        for _ in 0..limit {
            if done(self) {
                return;
            }
            self.publish();
        }
        panic!("not done after {limit} publishes");
    }

    /// Moves the paused clock on by `d` and runs the shard's tick, as its interval would.
    async fn tick_after(&mut self, d: Duration) {
        advance(d).await;
        self.shard.on_tick();
    }

    /// One round of the run loop's socket side: lets the I/O driver look at the sockets,
    /// then flushes the clients whose kernel buffer has room again.
    async fn pump(&mut self) {
        tokio::task::yield_now().await;
        while let Some(Some((key, id))) = self.shard.writable.next().now_or_never() {
            self.shard.on_writable(key, id);
        }
    }

    fn stats(&mut self) -> ShardStats {
        let (reply, mut answer) = oneshot::channel();
        self.shard.handle(ShardMsg::Stats(reply));
        answer.try_recv().expect("the shard answers stats at once")
    }

    /// Whether the shard holds more than one frame's bytes for `peer` (false once freed).
    fn backlogged(&self, peer: &Peer) -> bool {
        let frame = frame::encode(Opcode::Binary, &[0; PAYLOAD]).len();
        self.shard
            .client(peer.key, peer.id)
            .is_some_and(|c| c.out.unsent(self.shard.ring_of_client(c)) > frame)
    }

    fn is_freed(&self, peer: &Peer) -> bool {
        self.shard.client(peer.key, peer.id).is_none()
    }

    /// Reads `peer` until it has seen a close frame and end of file, pumping the shard
    /// between reads; returns its frames.
    async fn read_to_end(&mut self, peer: &mut Peer) -> Vec<Frame> {
        for _ in 0..ROUNDS {
            peer.read();
            if peer.eof {
                assert!(peer.unparsed.is_empty(), "a frame was cut short");
                return std::mem::take(&mut peer.frames);
            }
            self.pump().await;
        }
        panic!("no end of file after {ROUNDS} rounds: {:?}", peer.frames);
    }

    /// Reads `peer` until it has `n` frames, pumping the shard between reads; returns them.
    async fn read_until(&mut self, peer: &mut Peer, n: usize) -> Vec<Frame> {
        for _ in 0..ROUNDS {
            peer.read();
            if peer.frames.len() >= n {
                return std::mem::take(&mut peer.frames);
            }
            self.pump().await;
        }
        panic!("not {n} frames after {ROUNDS} rounds: {:?}", peer.frames);
    }
}

impl Shard {
    fn client(&self, key: usize, id: u64) -> Option<&super::Client> {
        self.clients.get(key).filter(|c| c.id == id)
    }
}

impl Peer {
    /// Reads what the kernel holds for this client now, without waiting.
    fn read(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        while !self.eof {
            match self.sock.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.unparsed.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("client read failed: {e}"),
            }
        }
        while let Some(frame) = parse(&mut self.unparsed) {
            self.frames.push(frame);
        }
    }

    /// The frames read so far, taken.
    fn take(&mut self) -> Vec<Frame> {
        self.read();
        std::mem::take(&mut self.frames)
    }

    /// Tells the shard the reader has ended, as the reader does on end of file.
    fn gone(&self) -> ShardMsg {
        ShardMsg::Gone {
            key: self.key,
            id: self.id,
        }
    }

    fn admission_returned(&self) -> bool {
        Arc::strong_count(&self.admission) == 1
    }
}

/// A connected pair of local sockets: the shard's end, ready for writing as far as tokio
/// knows, and the client's end, non-blocking.
async fn socket_pair(small: bool) -> (Arc<Socket>, StdUnixStream) {
    let (server, client) = StdUnixStream::pair().expect("a socket pair");
    if small {
        socket2::SockRef::from(&server)
            .set_send_buffer_size(SMALL_BUFFER)
            .expect("SO_SNDBUF");
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(SMALL_BUFFER)
            .expect("SO_RCVBUF");
    }
    server.set_nonblocking(true).expect("non-blocking");
    client.set_nonblocking(true).expect("non-blocking");
    let server = tokio::net::UnixStream::from_std(server).expect("registered");
    // tokio tries a write only once its driver has seen the socket writable: the upgrade
    // has done that for a real client by the time it attaches.
    for _ in 0..ROUNDS {
        if server.writable().now_or_never().is_some() {
            return (Arc::new(Socket::Local(server)), client);
        }
        tokio::task::yield_now().await;
    }
    panic!("a fresh socket never became writable");
}

/// Takes one whole server frame (unmasked) off the front of `buf`.
fn parse(buf: &mut Vec<u8>) -> Option<Frame> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[0] & 0x80, 0x80, "server frames are final");
    assert_eq!(buf[1] & 0x80, 0, "server frames are unmasked");
    let (len, header) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (usize::from(n), 2),
    };
    if buf.len() < header + len {
        return None;
    }
    let payload = &buf[header..header + len];
    let frame = match buf[0] & 0x0f {
        0x2 => Frame::Data(u64::from_be_bytes(
            payload[..8].try_into().expect("8 bytes"),
        )),
        0x9 => Frame::Ping,
        0x8 => Frame::Close(u16::from_be_bytes([payload[0], payload[1]])),
        op => panic!("unexpected opcode {op:#x}"),
    };
    buf.drain(..header + len);
    Some(frame)
}

/// `0..n` as data frames, then a close with `code`.
fn data_then_close(n: u64, code: u16) -> Vec<Frame> {
    (0..n)
        .map(Frame::Data)
        .chain([Frame::Close(code)])
        .collect()
}

#[tokio::test(start_paused = true)]
async fn slow_consumer_is_closed_with_4008_and_its_backlog_dropped() {
    let mut h = Harness::new(EngineConfig {
        send_queue_bytes: 16 * 1024,
        ..EngineConfig::default()
    });
    let mut peer = h.connect(true).await;
    // The client reads nothing. A batch goes out in one `writev`, of which the small kernel
    // buffer takes a few whole chunks, cutting a frame; then the send queue fills.
    h.publish_batch(16);
    h.publish_until(1000, |h| {
        h.stats().disconnects.get(DisconnectReason::SlowConsumer) == 1
    });
    let published = h.published;

    // Dropped in the batch that found it: closing, out of its topic, and of its backlog it
    // keeps only the half-written frame, ahead of the close frame.
    assert!(peer.conn.is_closing());
    assert!(!h.engine.interest().contains(&h.topic));
    let c = h
        .shard
        .client(peer.key, peer.id)
        .expect("closing, not freed");
    assert!(!c.is_open() && c.ring.is_none());
    assert_eq!(
        c.out.side.len(),
        2,
        "the rest of the half-written frame and the close frame (the setup should leave \
         a frame half-written)"
    );
    let deliveries = h.stats().deliveries;
    h.publish();
    assert_eq!(h.stats().deliveries, deliveries, "no more frames for it");

    // What the client reads once it catches up: the frames the kernel had taken, in order
    // and whole (a half-written one finished), then 4008, then end of file.
    let frames = h.read_to_end(&mut peer).await;
    let received = frames.len() as u64 - 1;
    assert!(
        received < published,
        "{received} of {published} frames: backlog kept"
    );
    assert_eq!(frames, data_then_close(received, close_code::SLOW_CONSUMER));

    // The close frame is out and the socket half-closed; the reader's end frees it.
    assert!(!h.is_freed(&peer));
    h.handle(peer.gone());
    assert!(h.is_freed(&peer) && peer.admission_returned());
    let stats = h.stats();
    assert_eq!(stats.connections, 0);
    assert_eq!(stats.disconnects.get(DisconnectReason::SlowConsumer), 1);
    assert_eq!(stats.disconnects.total(), 1);
}

/// A shard whose ping interval is 1 s and pong timeout 500 ms (tick 62.5 ms), with one
/// attached client that has read nothing yet.
async fn heartbeat() -> (Harness, Peer, Duration) {
    let config = EngineConfig {
        ping_interval: Duration::from_secs(1),
        pong_timeout: Duration::from_millis(500),
        ..EngineConfig::default()
    };
    let mut h = Harness::new(config);
    let tick = h.shard.tick;
    assert_eq!(tick, Duration::from_micros(62_500));
    let peer = h.connect(false).await;
    (h, peer, tick)
}

#[tokio::test(start_paused = true)]
async fn unanswered_ping_closes_with_4012_at_the_pong_deadline() {
    let (mut h, mut peer, tick) = heartbeat().await;
    let half = tick / 2;
    h.tick_after(Duration::from_secs(1) - tick - half).await;
    assert_eq!(peer.take(), NOTHING, "no ping before the interval");
    h.tick_after(tick * 2).await; // 1 s + half a tick
    assert_eq!(peer.take(), [Frame::Ping]);
    assert!(!peer.conn.alive.load(std::sync::atomic::Ordering::Relaxed));

    // No read from the client, so nothing marks it alive.
    h.tick_after(Duration::from_millis(500) - tick).await;
    assert_eq!(peer.take(), NOTHING, "still within the pong timeout");
    assert!(!peer.conn.is_closing());
    h.tick_after(tick).await; // the pong deadline
    assert!(peer.conn.is_closing());
    let stats = h.stats();
    assert_eq!(stats.disconnects.get(DisconnectReason::PongTimeout), 1);
    assert_eq!(stats.disconnects.total(), 1);
    assert_eq!(
        h.read_to_end(&mut peer).await,
        [Frame::Close(close_code::PONG_TIMEOUT)]
    );
    h.handle(peer.gone());
    assert!(h.is_freed(&peer) && peer.admission_returned());
}

#[tokio::test(start_paused = true)]
async fn answered_ping_is_followed_by_the_next_ping() {
    let (mut h, mut peer, tick) = heartbeat().await;
    let half = tick / 2;
    h.tick_after(Duration::from_secs(1) + half).await;
    assert_eq!(peer.take(), [Frame::Ping]);
    for round in 1..=3u32 {
        // The reader saw bytes (a pong, or anything) before the deadline.
        peer.conn.mark_alive();
        h.tick_after(Duration::from_millis(500)).await; // past the pong deadline
        assert_eq!(
            peer.take(),
            NOTHING,
            "round {round}: no close, no early ping"
        );
        assert!(!peer.conn.is_closing());
        // The next ping is due one interval after the last one.
        h.tick_after(Duration::from_millis(500) - tick).await;
        assert_eq!(peer.take(), NOTHING, "round {round}: not yet");
        h.tick_after(tick).await;
        assert_eq!(peer.take(), [Frame::Ping], "round {round}");
    }
    assert_eq!(h.stats().disconnects.total(), 0);
    assert!(!h.is_freed(&peer));
}

#[tokio::test(start_paused = true)]
async fn protocol_close_frees_a_client_that_never_drains_at_the_close_grace() {
    let mut h = Harness::new(EngineConfig::default());
    let tick = h.shard.tick;
    let mut peer = h.connect(true).await;
    // The client reads nothing: its kernel buffer fills and frames wait in the shard.
    h.publish_until(1000, |h| h.backlogged(&peer));
    h.handle(ShardMsg::Close {
        key: peer.key,
        id: peer.id,
        code: close_code::PROTOCOL_ERROR,
        reason: "protocol error",
        why: DisconnectReason::ProtocolError,
    });
    assert!(peer.conn.is_closing());
    assert_eq!(
        h.stats().disconnects.get(DisconnectReason::ProtocolError),
        1
    );

    h.tick_after(CLOSE_GRACE - tick).await;
    assert!(!h.is_freed(&peer), "freed before the close grace");
    assert!(!peer.admission_returned());
    h.tick_after(tick).await;
    assert!(h.is_freed(&peer), "not freed at the close grace");
    assert!(peer.admission_returned());
    let stats = h.stats();
    assert_eq!(stats.connections, 0);
    assert_eq!(stats.disconnects.total(), 1, "counted once");

    // The socket was shut down with the close frame still queued: the client reads what the
    // kernel held, then end of file.
    peer.read();
    assert!(peer.eof);
    assert!(peer.frames.iter().all(|f| matches!(f, Frame::Data(_))));
}

#[tokio::test(start_paused = true)]
async fn drain_closes_clients_at_an_even_pace_with_1001_after_their_backlog() {
    const N: usize = 10;
    let mut h = Harness::new(EngineConfig {
        // No write check fires during the test: the clients are stalled all along.
        write_timeout: Duration::from_secs(60),
        ..EngineConfig::default()
    });
    let mut peers = Vec::new();
    for _ in 0..N {
        peers.push(h.connect(true).await);
    }
    // Every client has a backlog in the shard, behind a full kernel buffer.
    h.publish_until(1000, |h| peers.iter().all(|p| h.backlogged(p)));
    let closing = |peers: &[Peer]| peers.iter().filter(|p| p.conn.is_closing()).count();

    let start = Instant::now();
    h.handle(ShardMsg::Drain {
        until: start + Duration::from_secs(10),
        deadline: start + Duration::from_secs(15),
    });
    assert_eq!(closing(&peers), 0);
    // By time t, ceil(N * t / 10 s) clients.
    for (at, due) in [(500, 1), (2_500, 3), (5_500, 6), (7_500, 8), (9_950, 10)] {
        let at = start + Duration::from_millis(at);
        h.tick_after(at - Instant::now()).await;
        assert_eq!(closing(&peers), due, "at {:?}", at - start);
        assert_eq!(
            h.stats().disconnects.get(DisconnectReason::Shutdown),
            due as u64
        );
    }
    // Draining: new clients are refused (the dropped reply).
    let (reply, mut answer) = oneshot::channel();
    h.shard.handle(ShardMsg::Reserve {
        id: 999,
        topics: Box::new([h.topic.clone()]),
        conn: Arc::default(),
        guard: Box::new(()),
        expires: None,
        reply,
    });
    assert!(answer.try_recv().is_err());

    // Each client gets its whole backlog, then 1001.
    let published = h.published;
    for peer in &mut peers {
        assert_eq!(
            h.read_to_end(peer).await,
            data_then_close(published, close_code::GOING_AWAY)
        );
        h.handle(peer.gone());
        assert!(h.is_freed(peer) && peer.admission_returned());
    }
    let stats = h.stats();
    assert_eq!(stats.connections, 0);
    assert_eq!(stats.disconnects.total(), N as u64);
}

#[tokio::test(start_paused = true)]
async fn messages_and_timers_for_a_freed_client_leave_the_next_one_in_its_slot_alone() {
    let mut h = Harness::new(EngineConfig::default()); // pings every 20 s
    let old = h.connect(false).await; // its first ping is due at 20 s
    h.handle(old.gone());
    assert!(h.is_freed(&old));
    h.tick_after(Duration::from_secs(5)).await;
    let mut new = h.connect(false).await; // first ping at 25 s
    assert_eq!(
        (new.key, new.id == old.id),
        (old.key, false),
        "the slot is reused"
    );

    let (stream, mut stray) = socket_pair(false).await;
    for msg in [
        ShardMsg::Control {
            key: old.key,
            id: old.id,
            frame: frame::pong(b"x"),
        },
        ShardMsg::Close {
            key: old.key,
            id: old.id,
            code: close_code::PROTOCOL_ERROR,
            reason: "stale",
            why: DisconnectReason::ProtocolError,
        },
        old.gone(),
        ShardMsg::Attach {
            key: old.key,
            id: old.id,
            stream,
        },
    ] {
        h.handle(msg);
    }
    // The stale attach's socket is shut down, so its reader would end.
    let mut buf = [0u8; 16];
    assert_eq!(stray.read(&mut buf).expect("end of file"), 0);

    // The old client's ping (20 s) finds a different id in its slot.
    h.tick_after(Duration::from_secs(15) + h.shard.tick / 2)
        .await;
    assert_eq!(new.take(), NOTHING);
    assert!(!new.conn.is_closing());
    h.tick_after(Duration::from_secs(5)).await;
    assert_eq!(new.take(), [Frame::Ping]);
    h.publish();
    assert_eq!(new.take(), [Frame::Data(0)]);
    let stats = h.stats();
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.disconnects.get(DisconnectReason::ClientClose), 1);
    assert_eq!(stats.disconnects.total(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_every_client_with_1001_at_once() {
    let mut h = Harness::new(EngineConfig::default());
    let tick = h.shard.tick;
    let mut reading = h.connect(false).await;
    let stuck = h.connect(true).await;
    h.publish_until(1000, |h| h.backlogged(&stuck));
    let published = h.published;
    h.handle(ShardMsg::Shutdown);
    assert!(reading.conn.is_closing() && stuck.conn.is_closing());
    assert_eq!(h.stats().disconnects.get(DisconnectReason::Shutdown), 2);
    assert_eq!(
        h.read_to_end(&mut reading).await,
        data_then_close(published, close_code::GOING_AWAY)
    );
    h.handle(reading.gone());
    assert!(h.is_freed(&reading));
    // The one that never reads goes at the close grace.
    h.tick_after(CLOSE_GRACE - tick).await;
    assert!(!h.is_freed(&stuck));
    h.tick_after(tick).await;
    assert!(h.is_freed(&stuck) && stuck.admission_returned());
    assert_eq!(h.stats().disconnects.total(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_ring_whose_readers_keep_up_holds_no_bytes_and_hands_back_a_burst() {
    let mut h = Harness::new(EngineConfig::default());
    let mut peer = h.connect(true).await;
    let (key, id) = (peer.key, peer.id);
    let ring = move |h: &Harness| {
        let c = h.shard.client(key, id).expect("open");
        let ring = h.shard.ring_of_client(c).expect("on a ring");
        (ring.len(), ring.capacity())
    };
    // A burst larger than the kernel takes at once: the ring holds it until it is read.
    h.publish_batch(200);
    assert!(
        ring(&h).0 > 0,
        "the client cannot have taken 200 KB at once"
    );
    let frames = h.read_until(&mut peer, 200).await;
    assert_eq!(frames, (0..200).map(Frame::Data).collect::<Vec<_>>());
    let (len, burst) = ring(&h);
    assert_eq!(len, 0, "every reader is at the head");
    assert!(
        burst >= 200 * PAYLOAD,
        "the burst's capacity is kept for the next one"
    );
    // The next publish uses little of it: once read, the buffer is handed back.
    h.publish();
    assert_eq!(h.read_until(&mut peer, 1).await, [Frame::Data(200)]);
    assert_eq!(ring(&h), (0, 0));
    let c = h.shard.client(key, id).expect("open");
    assert_eq!(c.out.side.capacity(), 0, "an idle client holds no buffer");
}

#[tokio::test(start_paused = true)]
async fn an_expiry_closes_its_client_with_4010_after_its_backlog_and_no_other() {
    let mut h = Harness::new(EngineConfig::default()); // pings every 20 s: none in this test
    let at = Instant::now() + Duration::from_secs(5);
    let mut expiring = h.connect_until(false, Some(at)).await;
    let mut other = h.connect(false).await;
    h.publish_batch(3);
    h.tick_after(Duration::from_millis(4_900)).await;
    assert!(!expiring.conn.is_closing(), "closed before its expiry");
    assert_eq!(h.stats().disconnects.total(), 0);
    // The wheel's tick is 100 ms with these settings: the close starts within one of `at`.
    h.tick_after(Duration::from_millis(200)).await;
    assert!(expiring.conn.is_closing());
    assert_eq!(h.stats().disconnects.get(DisconnectReason::TokenExpired), 1);
    assert_eq!(
        h.read_to_end(&mut expiring).await,
        data_then_close(3, close_code::TOKEN_EXPIRED)
    );
    h.handle(expiring.gone());
    assert!(h.is_freed(&expiring) && expiring.admission_returned());
    // The other client is untouched: still subscribed, still getting frames.
    h.publish();
    h.pump().await;
    assert_eq!(other.take(), (0..4).map(Frame::Data).collect::<Vec<_>>());
    assert!(!other.conn.is_closing());
    let stats = h.stats();
    assert_eq!(stats.disconnects.total(), 1);
    assert_eq!(stats.connections, 1);
}

#[tokio::test(start_paused = true)]
async fn a_publish_that_skips_one_client_reaches_every_other() {
    let mut h = Harness::new(EngineConfig::default());
    let mut sender = h.connect(false).await;
    let mut other = h.connect(false).await;
    h.publish_to("t", Some(sender.id));
    h.publish_to("t", None);
    // Both frames sit in one ring; the sender's write steps over the first.
    h.publish_to("t", Some(sender.id));
    assert_eq!(
        h.read_until(&mut other, 3).await,
        (0..3).map(Frame::Data).collect::<Vec<_>>()
    );
    assert_eq!(h.read_until(&mut sender, 1).await, [Frame::Data(1)]);
    h.pump().await;
    assert_eq!(sender.take(), NOTHING, "the skipped frames never reach it");
    assert_eq!(h.stats().queued_bytes, 0, "nothing left for anyone");
}

#[tokio::test(start_paused = true)]
async fn clients_on_several_topics_get_each_publish_once_in_publish_order() {
    let mut h = Harness::new(EngineConfig::default());
    let mut on_a = h.connect_to(&["a"]).await;
    let mut on_ab = h.connect_to(&["a", "b"]).await;
    let mut on_b = h.connect_to(&["b"]).await;
    // The same set in another order, and a duplicate: the same ring as `on_ab`.
    let mut on_ba = h.connect_to(&["b", "a", "b"]).await;
    assert_eq!(h.shard.rings.len(), 3, "one ring per distinct topic set");
    for topic in ["a", "b", "a", "a", "b"] {
        h.publish_to(topic, None);
    }
    let data = |ns: &[u64]| ns.iter().map(|&n| Frame::Data(n)).collect::<Vec<_>>();
    assert_eq!(h.read_until(&mut on_a, 3).await, data(&[0, 2, 3]));
    assert_eq!(h.read_until(&mut on_b, 2).await, data(&[1, 4]));
    assert_eq!(h.read_until(&mut on_ab, 5).await, data(&[0, 1, 2, 3, 4]));
    assert_eq!(h.read_until(&mut on_ba, 5).await, data(&[0, 1, 2, 3, 4]));
    // Rings and topics go with their last subscriber.
    for peer in [&on_a, &on_ab, &on_b, &on_ba] {
        h.handle(peer.gone());
    }
    assert!(h.shard.rings.is_empty() && h.shard.topics.is_empty());
    assert!(h.engine.interest().is_empty());
}

/// The ring with its budget, on real sockets: random connects, publish batches, partial
/// reads of random sizes and control frames. Every client reads exactly the frames published
/// since it joined, in order and whole, or a prefix of them and 4008; a client is dropped
/// only once more than the budget of what was sent to it is unread, and never holds more
/// unread than the budget plus what the kernel buffers can hold.
mod budget {
    use proptest::prelude::*;

    use super::*;

    const BUDGET: usize = 16 * 1024;
    /// Most a small socket pair's kernel buffers hold (generous: the kernel doubles
    /// `SMALL_BUFFER` and counts its own overhead).
    const KERNEL: usize = 64 * 1024;
    /// One published frame on the wire.
    const FRAME: usize = PAYLOAD + 4;

    #[derive(Debug, Clone)]
    enum Op {
        Connect,
        Publish(usize),
        /// Client (modulo their number), bytes it reads.
        Read(usize, usize),
        Ping(usize),
        Pump,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => Just(Op::Connect),
            4 => (1..8usize).prop_map(Op::Publish),
            4 => (0..8usize, 0..12_000usize).prop_map(|(c, n)| Op::Read(c, n)),
            1 => (0..8usize).prop_map(Op::Ping),
            1 => Just(Op::Pump),
        ]
    }

    /// A client of the model: the test's end and what it should see.
    struct Client {
        peer: Peer,
        /// The first sequence number it must read.
        joined_at: u64,
        /// Bytes the shard was given for it, and bytes it has read.
        sent: usize,
        read: usize,
        pings: usize,
        dropped: bool,
    }

    impl Client {
        fn read_some(&mut self, max: usize) {
            let mut chunk = vec![0u8; max];
            let n = match self.peer.sock.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                Err(e) => panic!("client read failed: {e}"),
            };
            self.read += n;
            self.peer.unparsed.extend_from_slice(&chunk[..n]);
        }
    }

    async fn run(ops: Vec<Op>) {
        let mut h = Harness::new(EngineConfig {
            send_queue_bytes: BUDGET,
            ..EngineConfig::default()
        });
        let mut clients: Vec<Client> = Vec::new();
        for op in ops {
            match op {
                Op::Connect => {
                    let peer = h.connect(true).await;
                    clients.push(Client {
                        peer,
                        joined_at: h.published,
                        sent: 0,
                        read: 0,
                        pings: 0,
                        dropped: false,
                    });
                }
                Op::Publish(n) => {
                    for c in clients.iter_mut().filter(|c| !c.dropped) {
                        c.sent += n * FRAME;
                    }
                    h.publish_batch(n);
                }
                Op::Read(i, n) if !clients.is_empty() => {
                    let k = clients.len();
                    clients[i % k].read_some(n);
                }
                Op::Ping(i) if !clients.is_empty() => {
                    let k = clients.len();
                    let c = &mut clients[i % k];
                    if !c.dropped {
                        let (key, id) = (c.peer.key, c.peer.id);
                        let frame = frame::ping();
                        c.sent += frame.len();
                        c.pings += 1;
                        h.handle(ShardMsg::Control { key, id, frame });
                    }
                }
                Op::Pump => h.pump().await,
                Op::Read(..) | Op::Ping(_) => {}
            }
            for c in clients.iter_mut().filter(|c| !c.dropped) {
                let unread = c.sent - c.read;
                if c.peer.conn.is_closing() {
                    c.dropped = true;
                    assert!(unread > BUDGET, "dropped with {unread} bytes unread");
                } else {
                    assert!(
                        unread <= BUDGET + KERNEL + FRAME,
                        "{unread} unread, not dropped"
                    );
                }
            }
        }
        h.shard.shutdown();
        let dropped = h.stats().disconnects.get(DisconnectReason::SlowConsumer);
        assert_eq!(
            dropped as usize,
            clients.iter().filter(|c| c.dropped).count()
        );
        let end = h.published;
        for c in &mut clients {
            let frames = h.read_to_end(&mut c.peer).await;
            let pings = frames.iter().filter(|f| **f == Frame::Ping).count();
            let mut data: Vec<_> = frames.into_iter().filter(|f| *f != Frame::Ping).collect();
            let close = data.pop();
            let expected: Vec<Frame> = (c.joined_at..end).map(Frame::Data).collect();
            if c.dropped {
                assert_eq!(close, Some(Frame::Close(close_code::SLOW_CONSUMER)));
                assert!(expected.starts_with(&data), "not a prefix: {data:?}");
                assert!(pings <= c.pings);
            } else {
                assert_eq!(close, Some(Frame::Close(close_code::GOING_AWAY)));
                assert_eq!(data, expected);
                assert_eq!(pings, c.pings);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn clients_get_their_frames_or_4008_past_the_budget(
            ops in prop::collection::vec(op(), 1..120)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .expect("a runtime");
            rt.block_on(run(ops));
        }
    }
}
