//! The `shardcast` package: the binary's command line (`cli`) and its `--config` file
//! (`config_file`), over the workspace's libraries, which it re-exports so embedders and the
//! integration tests have one name to import:
//! - `shardcast-core`: the engine (topics, frames, shards, the interest map, stats);
//! - `shardcast-server`: the relay around it ([`Server`], [`Relay`], [`Config`], the bus);
//! - `shardcast-bench`: the load generator and the `sub` and `pub` tools ([`loadgen`]).
//!
//! Running the binary lives in `main.rs`. See `docs/ARCHITECTURE.md` for the layering.

pub mod cli;
pub mod config_file;

pub use shardcast_bench as loadgen;
pub use shardcast_server::*;
