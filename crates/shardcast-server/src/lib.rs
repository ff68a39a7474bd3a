//! shardcast-server: the relay around the engine. It accepts connections, checks every
//! request, admits WebSocket clients against the connection limits, hands them to
//! `shardcast-core`'s [`Engine`], serves HTTP publishing and metrics, and joins other nodes
//! through a broker.
//!
//! The components, in the order a message meets them:
//! - `server`: the accept loop and the lifecycle ([`run`], [`Server`]).
//! - `tls`: optional TLS termination in front of everything else.
//! - `handshake`: routing and every request check, pure and fuzzable; `reject` counts refusals.
//! - `auth`: JWT, API keys and the origin allowlist that `handshake` consults; `jwks` keeps
//!   the keys of `--jwt-jwks-url`.
//! - `http`: admission against the connection limits, the upgrade, `POST /publish/{topic}`.
//! - `conn`: a connection's reader task (the parser is the engine's `FrameReader`).
//! - `relay`: [`Relay`], the publish function (engine, then bus), admission and stats.
//! - `bus`: joins nodes through Redis, Redis Cluster or NATS (`--bus`).
//! - `demo`: the browser demo page at `/` (on by default only on loopback).
//! - `metrics`: the Prometheus rendering of [`Stats`] for `GET /metrics`.
//! - `config`: [`Config`], where each setting is declared once (flag, variable, default,
//!   range check, help), and its validation.
//!
//! See `docs/ARCHITECTURE.md` for the layering rules and the invariants.

pub mod auth;
pub mod bus;
mod config;
mod conn;
mod demo;
mod error;
pub mod handshake;
mod http;
mod jwks;
pub mod metrics;
mod prepare;
mod process;
mod reject;
mod relay;
mod server;
mod tls;

pub use bus::{BusConfig, BusKind, BusStats, BusUrl};
pub use config::{
    AuthConfig, Config, Demo, JWT_KEY_SPELLINGS, JwtKey, LogFormat, MAX_DURATION, Secret,
    TlsConfig, default_shards, jwt_spellings_in_force,
};
pub use error::Error;
pub use jwks::{JwksStats, JwksUrl};
pub use prepare::Prepared;
pub use process::Process;
pub use reject::{RejectReason, RejectionCounts};
pub use relay::{Relay, Stats};
pub use server::{LISTEN_BACKLOG, Server, Stop, bind, run};
pub use shardcast_core::units::{parse_duration, parse_size};
pub use shardcast_core::{
    DisconnectCounts, DisconnectReason, Engine, MAX_SHARDS, MAX_TOPIC_LEN, Opcode, Topic,
    TopicError, frame, reader,
};

/// The production reader over a socket pair, for the `server_read` fuzz target and its
/// tests; not part of the API (feature `internals`).
#[cfg(feature = "internals")]
#[doc(hidden)]
pub use conn::fuzzing;
