//! The server's settings, each declared once: a [`Config`] field carries its flag, its
//! `SHARDCAST_*` variable, its default, its range check (the value parser) and its help text
//! (the doc comment), through clap's derive. The `--config` file and `shardcast config` read
//! these declarations generically (the binary's `config_file.rs`); nothing else lists the
//! settings. Also here: the parsers the declarations name, the composite settings (the JWT key,
//! API keys, the TLS pair, the bus), the checks between fields ([`Config::validate`]) and the
//! loading of keys and certificates, once ([`Config::prepare`]).
//!
//! Not here: subcommands, `--config` and the order of sources (the binary's `cli.rs`), the
//! TOML file (`config_file.rs`), and anything the engine needs to know about clap: the engine
//! gets plain values through [`Config::engine`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use shardcast_core::units::{parse_duration, parse_size};
use shardcast_core::{EngineConfig, MAX_SHARDS};

use crate::Error;
use crate::bus::{BusConfig, BusUrl};
use crate::jwks::JwksUrl;

/// Everything `run` needs: the settings of `shardcast serve`. Build it with
/// [`Config::default`] (the declared defaults, no variable read) and adjust, or from the
/// command line. Each field below is the whole declaration of its setting: the flag is its
/// name in kebab case, the `--config` file key is the flag's name, the doc comment is `--help`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct Config {
    /// Address to bind.
    // Used by the binary; `run` takes an already bound listener.
    #[arg(long, env = "SHARDCAST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Number of hub shards, 1 to 256 [default: number of cores].
    #[arg(long, env = "SHARDCAST_SHARDS", default_value_t = default_shards(), hide_default_value = true, value_parser = shard_count)]
    pub shards: usize,
    /// The server pings each client this often.
    #[arg(long, env = "SHARDCAST_PING_INTERVAL", default_value = "20s", value_parser = positive_duration)]
    pub ping_interval: Duration,
    /// A client that has not answered a ping within this time is disconnected (close 4012).
    #[arg(long, env = "SHARDCAST_PONG_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub pong_timeout: Duration,
    /// Largest message accepted from a client, after reassembling fragments.
    #[arg(long, env = "SHARDCAST_MAX_MESSAGE_BYTES", default_value = "65536", value_parser = positive_size)]
    pub max_message_bytes: usize,
    /// Per-client outbound budget; a client whose queue would pass it is dropped as a slow consumer.
    #[arg(long, env = "SHARDCAST_SEND_QUEUE_BYTES", default_value = "1MiB", value_parser = positive_size)]
    pub send_queue_bytes: usize,
    /// A socket write that makes no progress for this long drops the client.
    #[arg(long, env = "SHARDCAST_WRITE_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub write_timeout: Duration,
    /// Above this many WebSocket connections, new upgrades get HTTP 503.
    #[arg(long, env = "SHARDCAST_MAX_CONNECTIONS", default_value = "100000", value_parser = positive::<usize>)]
    pub max_connections: usize,
    /// Whether client messages are published (false: server-side publish only).
    #[arg(long, env = "SHARDCAST_CLIENT_PUBLISH", default_value_t = true, action = clap::ArgAction::Set)]
    pub client_publish: bool,
    /// On SIGTERM, the window over which clients are closed with 1001, in batches; whatever
    /// is left at its end is dropped.
    #[arg(long, env = "SHARDCAST_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// On SIGTERM, how long /readyz answers 503 while clients are still served, before closing starts.
    #[arg(long, env = "SHARDCAST_DRAIN_DELAY", default_value = "5s", value_parser = duration)]
    pub drain_delay: Duration,
    /// Serve /metrics on this address instead of the main port.
    #[arg(long, env = "SHARDCAST_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log line format.
    #[arg(long, env = "SHARDCAST_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// A client must finish TLS and send its request head within this time.
    #[arg(long, env = "SHARDCAST_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub handshake_timeout: Duration,
    /// Above this many WebSocket connections from one IP address, upgrades get HTTP 429 [default: no limit].
    #[arg(long, env = "SHARDCAST_MAX_CONNECTIONS_PER_IP", value_parser = positive::<usize>)]
    pub max_connections_per_ip: Option<usize>,
    /// Data messages a connection may publish per second, burst as many; beyond: close 1008 [default: no limit].
    #[arg(long, env = "SHARDCAST_CLIENT_PUBLISH_RATE", value_parser = positive::<u32>)]
    pub client_publish_rate: Option<u32>,
    /// Who may subscribe and publish.
    #[command(flatten)]
    pub auth: AuthConfig,
    /// Serve `wss://` and `https://` with this certificate; `None`: plain TCP.
    #[command(flatten)]
    pub tls: Option<TlsConfig>,
    /// Join other nodes through this broker (`--bus`); `None`: standalone.
    #[command(flatten)]
    pub bus: Option<BusConfig>,
    /// Serve the browser demo page at / (auto: only when listening on loopback and no JWT key is set).
    #[arg(long, env = "SHARDCAST_DEMO", value_enum, default_value = "auto")]
    pub demo: Demo,
}

/// Whether the browser demo page is served at `/` (`--demo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Demo {
    /// Only when listening on loopback and no JWT key is set.
    Auto,
    /// Always.
    True,
    /// Never.
    False,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Verifies the JWTs that grant subscribe and publish rights. With it, every WebSocket
    /// needs a token.
    pub jwt: Option<JwtKey>,
    /// Audiences a token's `aud` must name one of (`--jwt-audience`). Empty: `aud` is not
    /// checked.
    pub jwt_audience: Vec<String>,
    /// Issuers a token's `iss` must be one of (`--jwt-issuer`). Empty: `iss` is not checked.
    pub jwt_issuer: Vec<String>,
    /// How often the JWKS is fetched again (`--jwt-jwks-refresh`).
    pub jwks_refresh: Duration,
    /// Least time between a fetch of the JWKS and one caused by an unknown `kid`
    /// (`--jwt-jwks-cooldown`).
    pub jwks_cooldown: Duration,
    /// Bearer keys that may `POST /publish` to any topic.
    pub api_keys: Vec<Secret>,
    /// Browser origins allowed to open a WebSocket: exact (`https://app.example.com`) or a
    /// subdomain wildcard (`https://*.example.com`). Empty: any origin.
    pub allowed_origins: Vec<String>,
}

/// `--jwt-jwks-refresh`'s default.
pub const JWKS_REFRESH: Duration = Duration::from_secs(300);
/// `--jwt-jwks-cooldown`'s default.
pub const JWKS_COOLDOWN: Duration = Duration::from_secs(30);

impl Default for AuthConfig {
    /// Open, with the declared defaults of the JWKS timings.
    fn default() -> Self {
        Self {
            jwt: None,
            jwt_audience: Vec::new(),
            jwt_issuer: Vec::new(),
            jwks_refresh: JWKS_REFRESH,
            jwks_cooldown: JWKS_COOLDOWN,
            api_keys: Vec::new(),
            allowed_origins: Vec::new(),
        }
    }
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
    /// The keys of a JWKS endpoint, by `kid`, fetched at start and refreshed.
    Jwks(JwksUrl),
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hs256(s) => f.debug_tuple("Hs256").field(s).finish(),
            Self::PublicKeyPem(pem) => write!(f, "PublicKeyPem(<{} bytes>)", pem.len()),
            Self::Jwks(url) => f.debug_tuple("Jwks").field(url).finish(),
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

// The composite settings. Each is declared by a private struct of plain flags (clap's
// derive, like `Config`'s fields); the public type is built from it, which is where the
// flags are combined, files are read and pairs are checked.

/// The flags of [`AuthConfig`].
#[derive(Args)]
#[group(skip)]
struct AuthArgs {
    /// HS256 secret for client JWTs. Prefer the file or the variable: flags show in `ps`.
    // The three JWT flags are one setting with three spellings: not a clap group, because a
    // flag must beat a variable of another spelling (`jwt_spellings_in_force`).
    #[arg(long, env = "SHARDCAST_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// File holding the HS256 secret for client JWTs (a trailing newline is ignored).
    #[arg(long, env = "SHARDCAST_JWT_SECRET_FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// PEM public key that verifies client JWTs: RSA for RS256, EC P-256 for ES256.
    #[arg(long, env = "SHARDCAST_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<PathBuf>,
    /// JWKS endpoint (http:// or https://) whose keys verify client JWTs by kid; fetched at start (which fails without it) and refreshed.
    #[arg(long, env = "SHARDCAST_JWT_JWKS_URL")]
    jwt_jwks_url: Option<JwksUrl>,
    /// How often the JWKS is fetched again; a failed fetch keeps the last good keys.
    #[arg(long, env = "SHARDCAST_JWT_JWKS_REFRESH", default_value = "5m", value_parser = positive_duration)]
    jwt_jwks_refresh: Duration,
    /// A token with a kid the JWKS lacks refetches it, unless a fetch began less than this ago.
    #[arg(long, env = "SHARDCAST_JWT_JWKS_COOLDOWN", default_value = "30s", value_parser = positive_duration)]
    jwt_jwks_cooldown: Duration,
    /// Audience a token's aud must name (repeatable: any of them) [default: aud not checked].
    #[arg(long, env = "SHARDCAST_JWT_AUDIENCE", value_delimiter = ',')]
    jwt_audience: Vec<String>,
    /// Issuer a token's iss must be (repeatable: any of them) [default: iss not checked].
    #[arg(long, env = "SHARDCAST_JWT_ISSUER", value_delimiter = ',')]
    jwt_issuer: Vec<String>,
    /// Bearer key that may POST /publish to any topic (repeatable; comma-separated in the variable).
    #[arg(
        long,
        env = "SHARDCAST_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    api_key: Vec<String>,
    /// File of API keys, one per line; blank lines and lines starting with # are skipped.
    #[arg(long, env = "SHARDCAST_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Origin allowed to open a WebSocket: exact, or https://*.example.com (repeatable) [default: any].
    #[arg(long, env = "SHARDCAST_ALLOWED_ORIGIN", value_delimiter = ',')]
    allowed_origin: Vec<String>,
}

/// The ids of the JWT key's four spellings (`--jwt-secret`, `--jwt-secret-file`,
/// `--jwt-public-key`, `--jwt-jwks-url`), one setting.
pub const JWT_KEY_SPELLINGS: [&str; 4] = [
    "jwt_secret",
    "jwt_secret_file",
    "jwt_public_key",
    "jwt_jwks_url",
];

/// The JWT spellings that count in `matches`: those given by the strongest source present
/// (a flag, else a variable, else the file or a default). So a flag of one spelling replaces a
/// variable of another. More than one left is an error ([`AuthConfig`]'s parsing says so).
pub fn jwt_spellings_in_force(matches: &ArgMatches) -> Vec<&'static str> {
    let rank = |id: &str| match matches.value_source(id) {
        Some(ValueSource::CommandLine) => 2,
        Some(ValueSource::EnvVariable) => 1,
        _ => 0,
    };
    let given = JWT_KEY_SPELLINGS
        .into_iter()
        .filter(|id| matches.contains_id(id));
    let top = given.clone().map(rank).max();
    given.filter(|id| Some(rank(id)) == top).collect()
}

/// A configuration error in clap's type, as the composite settings' parsing returns.
fn invalid(message: String) -> clap::Error {
    clap::Error::raw(clap::error::ErrorKind::ValueValidation, message)
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, clap::Error> {
    std::fs::read(path).map_err(|e| invalid(format!("{flag} {}: {e}", path.display())))
}

impl AuthConfig {
    /// Combines the flags: one JWT key of three spellings (whose files are read here), the
    /// API keys of the flag and of the file.
    fn from_flags(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = AuthArgs::from_arg_matches(matches)?;
        let in_force = jwt_spellings_in_force(matches);
        if in_force.len() > 1 {
            let flags: Vec<String> = in_force
                .iter()
                .map(|id| format!("--{}", id.replace('_', "-")))
                .collect();
            return Err(invalid(format!(
                "{} set the same JWT key: give one of them",
                flags.join(" and ")
            )));
        }
        let jwt = match in_force.first().copied() {
            None => None,
            Some("jwt_secret") => args
                .jwt_secret
                .take()
                .map(|s| JwtKey::Hs256(Secret::new(s.into_bytes()))),
            Some("jwt_secret_file") => {
                let secret = args.jwt_secret_file.as_deref().map(|path| {
                    let mut secret = read_file("--jwt-secret-file", path)?;
                    // Only the line ending goes: other trailing spaces are the secret's.
                    while secret.last().is_some_and(|b| matches!(b, b'\r' | b'\n')) {
                        secret.pop();
                    }
                    Ok::<_, clap::Error>(JwtKey::Hs256(Secret::new(secret)))
                });
                secret.transpose()?
            }
            Some("jwt_jwks_url") => args.jwt_jwks_url.take().map(JwtKey::Jwks),
            Some(_) => {
                let pem = args.jwt_public_key.as_deref();
                let pem = pem.map(|path| read_file("--jwt-public-key", path));
                pem.transpose()?.map(JwtKey::PublicKeyPem)
            }
        };
        let mut api_keys: Vec<Secret> = args
            .api_key
            .into_iter()
            .map(|k| Secret::new(k.into_bytes()))
            .collect();
        if let Some(path) = &args.api_key_file {
            let text = read_file("--api-key-file", path)?;
            api_keys.extend(
                String::from_utf8_lossy(&text)
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| Secret::new(l.as_bytes())),
            );
        }
        Ok(Self {
            jwt,
            jwt_audience: args.jwt_audience,
            jwt_issuer: args.jwt_issuer,
            jwks_refresh: args.jwt_jwks_refresh,
            jwks_cooldown: args.jwt_jwks_cooldown,
            api_keys,
            allowed_origins: args.allowed_origin,
        })
    }
}

/// The flags of [`TlsConfig`]; the group tells clap's `Option` whether either half is given.
#[derive(Args)]
#[group(id = "tls")]
struct TlsArgs {
    // Not `requires`: each half may come from the flag, the variable or the file, so the
    // pair is checked once they are merged.
    /// PEM certificate chain: serve wss:// and https:// (needs --tls-key).
    #[arg(long, env = "SHARDCAST_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "SHARDCAST_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

impl TlsConfig {
    /// Called when either half is given: both must be.
    fn from_flags(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let missing = |given: &str, other: &str, var: &str| {
            invalid(format!(
                "--{given} needs --{other} (flag, {var} or {other} in the --config file)"
            ))
        };
        match TlsArgs::from_arg_matches(matches)? {
            TlsArgs {
                tls_cert: Some(cert),
                tls_key: Some(key),
            } => Ok(Self { cert, key }),
            TlsArgs {
                tls_cert: Some(_), ..
            } => Err(missing("tls-cert", "tls-key", "SHARDCAST_TLS_KEY")),
            TlsArgs { .. } => Err(missing("tls-key", "tls-cert", "SHARDCAST_TLS_CERT")),
        }
    }
}

/// The flags of [`BusConfig`]. Its group (`bus_url`, holding only `--bus`) tells clap's
/// `Option` whether there is a bus: `--bus-prefix` alone is not one.
#[derive(Args)]
#[group(skip)]
struct BusArgs {
    /// Join other nodes through a broker: redis://host:port, redis+cluster://host:port,host:port or nats://host:port; over TLS rediss://, rediss+cluster:// or tls://; credentials as user:password@ (NATS also token@) [default: standalone].
    #[arg(long, env = "SHARDCAST_BUS")]
    bus: Option<BusUrl>,
    /// Prefix of the broker channels (prefix:topic on Redis, prefix.topic on NATS).
    #[arg(long, env = "SHARDCAST_BUS_PREFIX", default_value = crate::bus::DEFAULT_PREFIX)]
    bus_prefix: String,
    /// PEM CA certificates that verify the broker's TLS certificate [default: the system's roots].
    #[arg(long, env = "SHARDCAST_BUS_CA_FILE")]
    bus_ca_file: Option<PathBuf>,
    /// NATS credentials file (user JWT and nkey seed) to authenticate to the broker.
    #[arg(long, env = "SHARDCAST_BUS_CREDS_FILE")]
    bus_creds_file: Option<PathBuf>,
}

const BUS_GROUP: &str = "bus_url";

impl BusConfig {
    fn from_flags(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let args = BusArgs::from_arg_matches(matches)?;
        let url = args.bus.ok_or_else(|| {
            invalid("--bus-prefix, --bus-ca-file and --bus-creds-file need --bus".into())
        })?;
        Ok(Self {
            prefix: args.bus_prefix,
            ca_file: args.bus_ca_file,
            creds_file: args.bus_creds_file,
            ..Self::new(url)
        })
    }
}

/// `clap::Args` for a public type whose flags are declared by a private struct: `augment`
/// adds them, `group` tells clap's `Option` whether any is given, and the type's `from_flags`
/// combines them.
macro_rules! declared_by {
    ($ty:ty, augment: $augment:expr, group: $group:expr) => {
        impl Args for $ty {
            fn group_id() -> Option<clap::Id> {
                $group
            }

            fn augment_args(cmd: clap::Command) -> clap::Command {
                $augment(cmd)
            }

            fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
                $augment(cmd)
            }
        }

        impl FromArgMatches for $ty {
            fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
                Self::from_flags(matches)
            }

            fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
                *self = Self::from_flags(matches)?;
                Ok(())
            }
        }
    };
}

declared_by!(AuthConfig, augment: AuthArgs::augment_args, group: None);
declared_by!(TlsConfig, augment: TlsArgs::augment_args, group: TlsArgs::group_id());
declared_by!(
    BusConfig,
    augment: |cmd| BusArgs::augment_args(cmd).group(clap::ArgGroup::new(BUS_GROUP).arg("bus")),
    group: Some(BUS_GROUP.into())
);

// The value parsers the declarations name: each range check is written here once and holds
// for flags, variables and the file alike.

/// A duration up to [`MAX_DURATION`].
fn duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > MAX_DURATION {
        return Err(format!("must be at most 24h, got {s:?}"));
    }
    Ok(d)
}

/// A duration above zero and up to [`MAX_DURATION`].
fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

/// A size above zero: plain bytes or with a unit (`64KiB`).
fn positive_size(s: &str) -> Result<usize, String> {
    match parse_size(s)? {
        0 => Err("must be greater than zero".into()),
        n => Ok(n),
    }
}

/// A whole number above zero.
fn positive<T>(s: &str) -> Result<T, String>
where
    T: FromStr + Default + PartialEq,
    T::Err: fmt::Display,
{
    let n: T = s.trim().parse().map_err(|e| format!("{e}"))?;
    if n == T::default() {
        return Err("must be greater than zero, got 0".into());
    }
    Ok(n)
}

/// A number of shards, 1 to [`MAX_SHARDS`].
fn shard_count(s: &str) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|e| format!("{e}"))?;
    if !(1..=MAX_SHARDS).contains(&n) {
        return Err(format!("must be between 1 and {MAX_SHARDS}, got {n}"));
    }
    Ok(n)
}

impl Default for Config {
    /// The declared defaults: what an empty command line gives, with no `SHARDCAST_*`
    /// variable read.
    fn default() -> Self {
        let cmd =
            Self::augment_args(clap::Command::new("shardcast")).mut_args(|a| a.env(None::<&str>));
        // No setting is required and every declared default passes its own value parser
        // (`the_declared_defaults_parse` checks both), so neither step can fail.
        let matches = cmd
            .try_get_matches_from(["shardcast"])
            .expect("no setting is required");
        Self::from_arg_matches(&matches).expect("the declared defaults are valid values")
    }
}

/// The number of cores, or 1 if it cannot be read.
pub fn default_shards() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_SHARDS)
}

impl Config {
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

    /// clap's own checks of the declarations (ids, groups, defaults against their parsers).
    #[test]
    fn the_declared_defaults_parse() {
        Config::augment_args(clap::Command::new("shardcast")).debug_assert();
        assert_eq!(Config::default().shards, default_shards());
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
