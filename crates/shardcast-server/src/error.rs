//! The server's error type. Expected outcomes (a slow client, a full queue, a refused topic)
//! are not errors and do not live here.

use std::net::SocketAddr;

/// Errors that stop the server, refuse its configuration, or refuse a publish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The cause is part of the message (not a `source()`), so it prints once however the
    /// error is formatted.
    #[error("failed to bind {addr}: {reason}")]
    Bind {
        addr: SocketAddr,
        reason: std::io::Error,
    },
    #[error("failed to read the listener's address: {0}")]
    LocalAddr(std::io::Error),
    #[error("message of {size} bytes is over the limit of {max} bytes")]
    MessageTooLarge { size: usize, max: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The first fetch of `--jwt-jwks-url` failed: the server does not start without keys.
    #[error("--jwt-jwks-url {url}: the first fetch failed: {reason}")]
    Jwks { url: String, reason: String },
}

impl From<shardcast_core::Error> for Error {
    fn from(e: shardcast_core::Error) -> Self {
        match e {
            shardcast_core::Error::MessageTooLarge { size, max } => {
                Self::MessageTooLarge { size, max }
            }
            shardcast_core::Error::ShuttingDown => Self::ShuttingDown,
        }
    }
}
