//! shardcast-core: the broadcast engine. It takes a message for a topic and writes it to
//! every local WebSocket client subscribed to that topic; it knows no HTTP, no configuration
//! format, no TLS, no credentials and no broker (the server crate brings those).
//!
//! The components, in the order a message meets them:
//! - `engine`: [`Engine`], the handle: the one local publish function, reservation of
//!   connections, the drain, stats.
//! - `interest`: the [`Interest`] map (which shards have which topics) and its watcher.
//! - `config`: [`EngineConfig`], what the engine needs of the server's settings.
//! - `frame`: encodes each published frame once; close codes.
//! - `shard`: hub shards that own clients, fan out, write, and run heartbeats.
//! - `wheel`: the timer wheel each shard drives.
//! - `reader`: [`FrameReader`](reader::FrameReader), the buffer-free parser of client frames.
//! - `socket`: [`Socket`], a TCP stream or a [`Sealed`] (TLS) one, and the [`Sealed`] trait
//!   the server implements.
//! - `topic`, `disconnect`, `stats`, `units`, `error`: the shared vocabulary.
//!
//! See `docs/ARCHITECTURE.md` for the invariants that hold these together.

mod config;
mod disconnect;
mod engine;
mod error;
pub mod frame;
mod interest;
pub mod reader;
mod shard;
mod socket;
mod stats;
mod topic;
pub mod units;
mod wheel;

pub use config::{EngineConfig, MAX_SHARDS};
pub use disconnect::{DisconnectCounts, DisconnectReason};
pub use engine::{Engine, Slot, Source, Stats};
pub use error::Error;
pub use frame::Opcode;
pub use interest::{Interest, InterestWatcher};
pub use shard::ConnShared;
pub use shard::Guard;
pub use socket::{Sealed, Socket};
pub use stats::{FANOUT_BOUNDS, Histogram, QUEUE_BOUNDS};
pub use topic::{MAX_TOPIC_LEN, Topic, TopicError};
pub use wheel::TimerWheel;

/// Hooks for tests, benches and fuzz targets; not part of the API (feature `internals`).
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod internals {
    pub use crate::shard::{FanoutFixture, RingModel, RingOp, ShardMsg, SocketFixture};
}
