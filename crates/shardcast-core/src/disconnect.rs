//! Why clients leave, and the plain per-shard counters of it. A slow consumer, a pong
//! timeout or an expired token is an expected outcome recorded here, not an error.

/// The reason a client was disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// The client closed, or its connection ended.
    ClientClose,
    /// Its send queue would have passed `--send-queue-bytes` (close 4008).
    SlowConsumer,
    /// It did not answer a ping within `--pong-timeout` (close 4012).
    PongTimeout,
    /// It broke RFC 6455 or our rules (close 1002, 1007, 1008 or 1009).
    ProtocolError,
    /// A write made no progress for `--write-timeout`.
    WriteTimeout,
    /// The server shut down (close 1001).
    Shutdown,
    /// It published faster than `--client-publish-rate` (close 1008).
    RateLimited,
    /// The expiry its reservation was given (a token's `exp`) passed (close 4010).
    TokenExpired,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 8] = [
        Self::ClientClose,
        Self::SlowConsumer,
        Self::PongTimeout,
        Self::ProtocolError,
        Self::WriteTimeout,
        Self::Shutdown,
        Self::RateLimited,
        Self::TokenExpired,
    ];

    /// The label used in logs (and the metrics of the operations work).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientClose => "client_close",
            Self::SlowConsumer => "slow_consumer",
            Self::PongTimeout => "pong_timeout",
            Self::ProtocolError => "protocol_error",
            Self::WriteTimeout => "write_timeout",
            Self::Shutdown => "shutdown",
            Self::RateLimited => "rate_limited",
            Self::TokenExpired => "token_expired",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Disconnect counts by reason. Shards own one each and only add to it; readers sum copies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisconnectCounts([u64; DisconnectReason::ALL.len()]);

impl DisconnectCounts {
    pub fn record(&mut self, why: DisconnectReason) {
        self.0[why.index()] += 1;
    }

    pub(crate) fn add(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// How many clients left for `why`.
    pub fn get(&self, why: DisconnectReason) -> u64 {
        self.0[why.index()]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}
