//! shardcast: a WebSocket broadcast relay. A message published to a topic, by a client or
//! over HTTP, reaches every subscriber of that topic.
//!
//! The components, in the order a message meets them:
//! - `server`: the accept loop and the lifecycle ([`run`], [`Server`]).
//! - `tls`: optional TLS termination in front of everything else.
//! - `handshake`: routing and every request check, pure and fuzzable.
//! - `auth`: JWT, API keys and the origin allowlist that `handshake` consults.
//! - `http`: admission against the connection limits, the upgrade, `POST /publish/{topic}`.
//! - `conn` and `reader`: a connection's reader task and its buffer-free frame parser.
//! - `relay`: the one publish function and the topic interest registry ([`Relay`]).
//! - `bus`: joins nodes through Redis, Redis Cluster or NATS (`--bus`).
//! - `frame`: encodes each published frame once.
//! - `shard`: hub shards that own clients, fan out, write, and run heartbeats.
//! - `wheel`: the timer wheel each shard drives.
//! - `metrics`: the Prometheus rendering of [`Stats`] for `GET /metrics`.
//! - `config`, `config_file` and `cli`: the validated [`Config`], the `--config` TOML file,
//!   and the command line that builds it.
//!
//! See `docs/ARCHITECTURE.md` for the invariants that hold these together.

pub mod auth;
pub mod bus;
pub mod cli;
mod config;
pub mod config_file;
mod conn;
mod disconnect;
mod error;
pub mod frame;
pub mod handshake;
mod http;
pub mod loadgen;
pub mod metrics;
pub mod reader;
mod relay;
mod server;
mod shard;
mod socket;
mod tls;
mod topic;
mod wheel;

pub use bus::{BusConfig, BusKind, BusStats, BusUrl};
pub use config::{
    AuthConfig, Config, JwtKey, LogFormat, MAX_SHARDS, Secret, TlsConfig, parse_duration,
    parse_size,
};
#[doc(hidden)]
pub use conn::fuzzing;
pub use disconnect::{DisconnectCounts, DisconnectReason};
pub use error::Error;
pub use frame::Opcode;
pub use handshake::{RejectReason, RejectionCounts};
pub use relay::{Relay, Stats};
pub use server::{Server, Stop, bind, run};
#[doc(hidden)]
pub use shard::FanoutFixture;
pub use topic::{MAX_TOPIC_LEN, Topic, TopicError};
pub use wheel::TimerWheel;
