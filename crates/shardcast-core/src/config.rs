//! What the engine needs to know of the configuration ([`EngineConfig`]), and the bound on
//! the number of shards. The server's settings, their flags and files live in the server
//! crate, which builds this from its own `Config`.

use std::time::Duration;

/// Upper bound on the number of shards; the interest map keeps a fixed-size shard bitset.
pub const MAX_SHARDS: usize = 256;

/// What the engine needs to know of the configuration. The server builds it from its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Number of hub shards (tasks): 1 to [`MAX_SHARDS`].
    pub shards: usize,
    /// Each client is pinged this often.
    pub ping_interval: Duration,
    /// A client that has not answered a ping within this time is closed with 4012.
    pub pong_timeout: Duration,
    /// A socket write that makes no progress for this long drops the client.
    pub write_timeout: Duration,
    /// Per-client outbound budget; a client whose queue would pass it is a slow consumer.
    pub send_queue_bytes: usize,
    /// Largest payload `publish` accepts.
    pub max_message_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            shards: 1,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            send_queue_bytes: 1 << 20,
            max_message_bytes: 65536,
        }
    }
}
