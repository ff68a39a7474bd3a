//! The validated server configuration and the parsers for its duration and size values.
//!
//! Command-line and environment handling live in `cli.rs`; this file only knows what a valid
//! configuration is.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shardcast_core::{EngineConfig, MAX_SHARDS};

use crate::Error;
use crate::bus::BusConfig;

/// Everything `run` needs. Build it with [`Config::default`] and adjust, or from the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address to bind (used by the binary; `run` takes an already bound listener).
    pub listen: SocketAddr,
    /// Number of hub shards (tasks). 1 to [`MAX_SHARDS`].
    pub shards: usize,
    /// The server pings each client this often.
    pub ping_interval: Duration,
    /// A client that has not answered a ping within this time is disconnected (close 4012).
    pub pong_timeout: Duration,
    /// Largest message accepted from a client, after reassembling fragments.
    pub max_message_bytes: usize,
    /// Per-client outbound budget; a client whose queue would pass it is a slow consumer.
    pub send_queue_bytes: usize,
    /// A socket write that makes no progress for this long drops the client.
    pub write_timeout: Duration,
    /// Above this many WebSocket connections, new upgrades get HTTP 503.
    pub max_connections: usize,
    /// Whether messages from clients are published.
    pub client_publish: bool,
    /// On shutdown, the window over which clients are closed (in batches) and their close
    /// frames flushed; whatever is left at its end is dropped.
    pub drain_timeout: Duration,
    /// On shutdown, how long to keep serving (with `/readyz` answering 503) before the first
    /// client is closed, so a load balancer can stop sending new ones.
    pub drain_delay: Duration,
    /// Serve `/metrics` on this address instead of the main port.
    pub metrics_listen: Option<SocketAddr>,
    /// How the binary formats its logs.
    pub log_format: LogFormat,
    /// A client must send its complete request head within this time, or it is disconnected.
    pub handshake_timeout: Duration,
    /// Above this many WebSocket connections from one IP address, new upgrades get HTTP 429.
    /// `None`: no per-address limit.
    pub max_connections_per_ip: Option<usize>,
    /// Data messages a connection may publish per second (with a burst of as many); beyond
    /// it the client is closed with 1008. `None`: no limit.
    pub client_publish_rate: Option<u32>,
    /// Who may subscribe and publish.
    pub auth: AuthConfig,
    /// Serve `wss://` and `https://` with this certificate; `None`: plain TCP.
    pub tls: Option<TlsConfig>,
    /// Join other nodes through this broker (`--bus`); `None`: standalone.
    pub bus: Option<BusConfig>,
}

/// A validated [`Config`] with its credentials and TLS files loaded ([`Config::prepare`]).
pub struct Prepared {
    pub(crate) config: Config,
    pub(crate) auth: crate::auth::Auth,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Prepared {
    pub fn config(&self) -> &Config {
        &self.config
    }
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Log line format of the binary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// Credentials and origin rules. The default is open: anyone may subscribe and publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// Verifies the JWTs that grant subscribe and publish rights. With it, every WebSocket
    /// needs a token.
    pub jwt: Option<JwtKey>,
    /// Bearer keys that may `POST /publish` to any topic.
    pub api_keys: Vec<Secret>,
    /// Browser origins allowed to open a WebSocket: exact (`https://app.example.com`) or a
    /// subdomain wildcard (`https://*.example.com`). Empty: any origin.
    pub allowed_origins: Vec<String>,
}

impl AuthConfig {
    /// Whether any credential is configured (else the relay is open).
    pub fn is_enabled(&self) -> bool {
        self.jwt.is_some() || !self.api_keys.is_empty()
    }

    /// The warning to log loudly at start when a listener that is not on loopback lets
    /// clients in without a token.
    pub fn open_access_warning(&self, addr: SocketAddr) -> Option<&'static str> {
        if addr.ip().is_loopback() || self.jwt.is_some() {
            return None;
        }
        Some(if self.api_keys.is_empty() {
            "NO AUTHENTICATION: anyone who can reach this address may subscribe to and publish on every topic"
        } else {
            "websocket clients need no token: anyone who can reach this address may subscribe, and publish unless --client-publish=false"
        })
    }
}

/// How JWT signatures are checked.
#[derive(Clone, PartialEq, Eq)]
pub enum JwtKey {
    /// A shared HS256 secret.
    Hs256(Secret),
    /// A PEM public key: RSA keys check RS256, EC P-256 keys check ES256.
    PublicKeyPem(Vec<u8>),
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hs256(s) => f.debug_tuple("Hs256").field(s).finish(),
            Self::PublicKeyPem(pem) => write!(f, "PublicKeyPem(<{} bytes>)", pem.len()),
        }
    }
}

/// Bytes that must never reach a log: `Debug` prints a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<[u8]>);

impl Secret {
    pub fn new(bytes: impl Into<Box<[u8]>>) -> Self {
        Self(bytes.into())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// PEM files for TLS, read when the server starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Upper bound on every duration setting.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: default_shards(),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            max_message_bytes: 65536,
            send_queue_bytes: 1 << 20,
            write_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            client_publish: true,
            drain_timeout: Duration::from_secs(10),
            drain_delay: Duration::from_secs(5),
            metrics_listen: None,
            log_format: LogFormat::Text,
            handshake_timeout: Duration::from_secs(10),
            max_connections_per_ip: None,
            client_publish_rate: None,
            auth: AuthConfig::default(),
            tls: None,
            bus: None,
        }
    }
}

/// The number of cores, or 1 if it cannot be read.
pub fn default_shards() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_SHARDS)
}

impl Config {
    /// Validates the configuration and loads what it names: the JWT key is parsed and the
    /// TLS certificate and key are read, once, here. The binary calls this before it serves
    /// (and `shardcast config` to check), so a bad file is a configuration error (exit 2).
    pub fn prepare(self) -> Result<Prepared, Error> {
        self.validate()?;
        let auth = crate::auth::Auth::new(&self.auth)?;
        let tls = self.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        Ok(Prepared {
            config: self,
            auth,
            tls,
        })
    }

    /// What the engine needs of this configuration.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            shards: self.shards,
            ping_interval: self.ping_interval,
            pong_timeout: self.pong_timeout,
            write_timeout: self.write_timeout,
            send_queue_bytes: self.send_queue_bytes,
            max_message_bytes: self.max_message_bytes,
        }
    }

    /// Checks the relations between fields that single-value parsing cannot see.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return bad(format!(
                "--shards must be between 1 and {MAX_SHARDS}, got {}",
                self.shards
            ));
        }
        for (name, d) in [
            ("--ping-interval", self.ping_interval),
            ("--pong-timeout", self.pong_timeout),
            ("--write-timeout", self.write_timeout),
            ("--handshake-timeout", self.handshake_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be greater than zero"));
            }
            // Far beyond any use, and keeps tick arithmetic far from overflow.
            if d > MAX_DURATION {
                return bad(format!("{name} must be at most 24h, got {d:?}"));
            }
        }
        for (name, d) in [
            ("--drain-timeout", self.drain_timeout),
            ("--drain-delay", self.drain_delay),
        ] {
            if d > MAX_DURATION {
                return bad(format!("{name} must be at most 24h, got {d:?}"));
            }
        }
        if self.max_message_bytes == 0 {
            return bad("--max-message-bytes must be greater than zero".into());
        }
        if self.max_connections == 0 {
            return bad("--max-connections must be greater than zero".into());
        }
        if self.max_connections_per_ip == Some(0) {
            return bad("--max-connections-per-ip must be greater than zero".into());
        }
        if self.client_publish_rate == Some(0) {
            return bad("--client-publish-rate must be greater than zero".into());
        }
        if let Some(bus) = &self.bus {
            bus.validate().map_err(Error::Config)?;
        }
        let largest_frame =
            self.max_message_bytes + crate::frame::header_len(self.max_message_bytes);
        if self.send_queue_bytes < largest_frame {
            return bad(format!(
                "--send-queue-bytes ({}) must hold at least one largest message ({largest_frame} bytes with its header)",
                self.send_queue_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_open_access_off_loopback_is_warned_about() {
        let open = AuthConfig::default();
        let public: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        let v6_loopback: SocketAddr = "[::1]:8080".parse().expect("addr");
        assert!(open.open_access_warning(Config::default().listen).is_none());
        assert!(open.open_access_warning(v6_loopback).is_none());
        assert!(
            open.open_access_warning(public)
                .unwrap()
                .contains("NO AUTHENTICATION")
        );
        let keys_only = AuthConfig {
            api_keys: vec![Secret::new(b"k".to_vec())],
            ..AuthConfig::default()
        };
        assert!(keys_only.open_access_warning(public).is_some());
        let jwt = AuthConfig {
            jwt: Some(JwtKey::Hs256(Secret::new(b"k".to_vec()))),
            ..AuthConfig::default()
        };
        assert!(jwt.open_access_warning(public).is_none());
    }

    #[test]
    fn defaults_are_valid_and_bad_relations_are_refused() {
        Config::default().validate().unwrap();
        let c = Config {
            send_queue_bytes: 1000,
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--send-queue-bytes")
        );
        let c = Config {
            shards: 0,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            ping_interval: Duration::from_secs(u64::MAX / 2),
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("at most 24h")
        );
    }
}
