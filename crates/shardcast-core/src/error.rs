//! The engine's error type. Expected outcomes (a slow client, a full queue) are not errors
//! and do not live here: they are disconnect reasons (`disconnect.rs`).

/// Why the engine refused a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("message of {size} bytes is over the limit of {max} bytes")]
    MessageTooLarge { size: usize, max: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
}
