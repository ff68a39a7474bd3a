//! The integration tests of the `shardcast` package, linked as one test binary (`--test it`)
//! rather than one per file. Each module is one area; `common` holds the shared harness: an
//! in-process relay, WebSocket and raw-socket clients, and (`common::brokers`) the Redis,
//! Redis Cluster and NATS servers the bus tests start on free ports.
//!
//! Run one area by its module prefix: `cargo test --test it -- bus::` (add
//! `--include-ignored` for the tests that need brokers; `.ci/run` does).

mod common;

mod auth;
mod broadcast;
mod bus;
mod cli;
mod drain;
mod lifecycle;
mod loadgen;
mod netfault;
mod tls;
mod tokens;
mod top;
mod violations;
