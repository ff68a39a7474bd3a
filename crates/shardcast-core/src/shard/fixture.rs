//! A shard with subscribers and no sockets, for measuring the in-process cost of fan-out
//! (`benches/engine.rs`). Compiled only with feature `internals`; not part of the API.
//!
//! What does not live here: the shard's own unit tests (`tests.rs`), which drive a shard
//! with real sockets on a paused clock.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{ConnShared, Shard, ShardMsg};
use crate::Topic;
use crate::config::EngineConfig;
use crate::frame;
use crate::interest::Interest;

/// One shard with `k` subscribers of one topic and no sockets, for measuring the in-process
/// cost of fan-out (`benches/engine.rs`). Not part of the API (feature `internals`).
pub struct FanoutFixture {
    shard: Shard,
    topic: Topic,
    frame: Bytes,
    /// The reservations' answers, kept so the shard sees the handshakes as still waiting.
    _replies: Vec<oneshot::Receiver<usize>>,
}

impl FanoutFixture {
    /// `k` subscribers, each with a send budget large enough for `burst` frames of
    /// `payload` bytes between two [`FanoutFixture::drain`] calls.
    pub fn new(k: usize, payload: usize, burst: usize) -> Self {
        let frame = frame::encode(crate::Opcode::Binary, &vec![7u8; payload]);
        let config = EngineConfig {
            shards: 1,
            send_queue_bytes: (frame.len() * burst).max(1 << 20),
            ..EngineConfig::default()
        };
        // A shard alone: no engine, so no inbox and no watcher of its interest.
        let mut shard = Shard::new(0, config, Arc::new(Interest::new(None)));
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
                expires: None,
                reply,
            });
        }
        Self {
            shard,
            topic,
            frame,
            _replies: replies,
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
