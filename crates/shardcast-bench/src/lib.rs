//! The load generator (`shardcast bench`) and the curl-like tools (`shardcast sub`,
//! `shardcast pub`). They drive any WebSocket broadcast server through URL templates; nothing
//! here touches the relay's engine.
//!
//! - `args`: the command-line flags of `bench`, `sub` and `pub`, re-used by `cli.rs`.
//! - `url`: URL templates (`{topic}`) and their parsing.
//! - `client`: the lean WebSocket client: dialing from 127.0.0.x, the handshake, masked
//!   client frames and the parser for server frames.
//! - `post`: a keep-alive HTTP/1.1 client for `POST` publishing.
//! - `payload`: the stamp (send time, sequence, publisher) at fixed offsets in each payload.
//! - `scenario`: `fanout`, `chat`, `idle`, `connect` and `soak`, as run inside one worker.
//! - `soak`: the soak's parent side: probes, publishes, the server's metrics over time, the
//!   verdict.
//! - `worker`: the parent/worker protocol, worker processes and the parent's orchestration.
//! - `report`: the merged result, its human summary and its JSON form.
//! - `sys`: CPU, RSS and kernel socket memory read from the OS.
//! - `tools`: `sub` and `pub`.
//! - `top`: `shardcast top`, a live view of nodes' `/metrics`.

pub mod args;
pub mod client;
pub mod payload;
pub mod post;
pub mod report;
mod scenario;
pub mod soak;
pub mod sys;
pub mod tools;
pub mod top;
pub mod url;
pub mod worker;

pub use args::{BenchArgs, PubArgs, Scenario, SubArgs};
pub use report::Report;
pub use top::{TopArgs, run_top};
pub use worker::{run_bench, run_worker_process};

/// Why a bench, a worker or a tool failed. `BadArgs` maps to exit code 2, the rest to 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadArgs(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("refused: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Refused { status: u16, body: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    Failed(String),
    #[error("worker {index}: {message}")]
    Worker { index: usize, message: String },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether this error is a bad flag or value (exit code 2).
    pub fn is_bad_args(&self) -> bool {
        matches!(self, Error::BadArgs(_))
    }
}
