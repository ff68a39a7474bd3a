//! Command-line parsing: raw arguments and `SHARDCAST_*` variables become a validated
//! [`Config`] in one step. Running the server lives in `server.rs`, not here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::bus::{BusConfig, BusUrl};
use crate::{AuthConfig, Config, JwtKey, LogFormat, Secret, TlsConfig, parse_duration, parse_size};

/// A WebSocket broadcast relay: what is published to a topic reaches every subscriber.
#[derive(Debug, Parser)]
#[command(name = "shardcast", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags for `serve`, which runs when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve WebSocket subscribers and HTTP publishers (the default).
    Serve(ServeArgs),
    /// Print the effective configuration (flags, environment, --config file, defaults) as
    /// TOML, secrets redacted, and exit.
    Config(ServeArgs),
    /// Load generator: drive any WebSocket broadcast server and measure it.
    Bench(crate::loadgen::BenchArgs),
    /// Print each message received on a WebSocket, one per line.
    Sub(crate::loadgen::SubArgs),
    /// Publish a message, or each line of stdin, over WebSocket or HTTP POST.
    Pub(crate::loadgen::PubArgs),
    /// Watch the /metrics of one or several nodes, busiest first, refreshed each second.
    Top(crate::loadgen::TopArgs),
    /// Write the man page and shell completions into DIR (for packaging; internal).
    #[command(name = "__assets", hide = true)]
    Assets {
        /// Where to write `shardcast.1` and `completions/`.
        dir: std::path::PathBuf,
    },
    /// One worker process of `bench` (internal).
    #[command(name = "__bench-worker", hide = true)]
    BenchWorker,
}

/// Flags of `shardcast serve`. Each also reads the `SHARDCAST_*` variable named in its help,
/// and each but `--config` may be set in the `--config` file under the flag's name.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML file with the same keys as these flags; flags and variables take precedence.
    #[arg(long, env = "SHARDCAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to bind.
    #[arg(long, env = "SHARDCAST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Number of hub shards [default: number of cores].
    #[arg(long, env = "SHARDCAST_SHARDS", value_parser = clap::value_parser!(u16).range(1..=crate::MAX_SHARDS as i64))]
    pub shards: Option<u16>,
    /// The server pings each client this often.
    #[arg(long, env = "SHARDCAST_PING_INTERVAL", default_value = "20s", value_parser = positive_duration)]
    pub ping_interval: Duration,
    /// A client that has not answered a ping within this time is disconnected.
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
    #[arg(long, env = "SHARDCAST_MAX_CONNECTIONS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// Whether client messages are published (false: server-side publish only).
    #[arg(long, env = "SHARDCAST_CLIENT_PUBLISH", default_value_t = true, action = ArgAction::Set)]
    pub client_publish: bool,
    /// On SIGTERM, the window over which clients are closed with 1001, in batches.
    #[arg(long, env = "SHARDCAST_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// On SIGTERM, how long /readyz answers 503 while clients are still served, before closing starts.
    #[arg(long, env = "SHARDCAST_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
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
    #[arg(long, env = "SHARDCAST_MAX_CONNECTIONS_PER_IP", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections_per_ip: Option<u64>,
    /// Data messages a connection may publish per second, burst as many; beyond: close 1008 [default: no limit].
    #[arg(long, env = "SHARDCAST_CLIENT_PUBLISH_RATE", value_parser = clap::value_parser!(u32).range(1..))]
    pub client_publish_rate: Option<u32>,
    /// HS256 secret for client JWTs. Prefer the file or the variable: flags show in `ps`.
    // The three JWT flags are one setting with three spellings: not a clap group, because a
    // flag must beat a variable of another spelling (`with_file`); `into_config` refuses two.
    #[arg(long, env = "SHARDCAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the HS256 secret for client JWTs (a trailing newline is ignored).
    #[arg(long, env = "SHARDCAST_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key that verifies client JWTs: RSA for RS256, EC P-256 for ES256.
    #[arg(long, env = "SHARDCAST_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Bearer key that may POST /publish to any topic (repeatable; comma-separated in the variable).
    #[arg(
        long,
        env = "SHARDCAST_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_key: Vec<String>,
    /// File of API keys, one per line; blank lines and lines starting with # are skipped.
    #[arg(long, env = "SHARDCAST_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Origin allowed to open a WebSocket: exact, or https://*.example.com (repeatable) [default: any].
    #[arg(long, env = "SHARDCAST_ALLOWED_ORIGIN", value_delimiter = ',')]
    pub allowed_origin: Vec<String>,
    // Not `requires`: each half may come from the flag, the variable or the file, so the
    // pair is checked once they are merged (`into_config`).
    /// PEM certificate chain: serve wss:// and https:// (needs --tls-key).
    #[arg(long, env = "SHARDCAST_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "SHARDCAST_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Join other nodes through a broker: redis://host:port, redis+cluster://host:port,host:port or nats://host:port [default: standalone].
    #[arg(long, env = "SHARDCAST_BUS")]
    pub bus: Option<BusUrl>,
    /// Prefix of the broker channels (prefix:topic on Redis, prefix.topic on NATS).
    #[arg(long, env = "SHARDCAST_BUS_PREFIX", default_value = crate::bus::DEFAULT_PREFIX)]
    pub bus_prefix: String,
}

fn read_file(flag: &str, path: &Path) -> Result<String, crate::Error> {
    std::fs::read_to_string(path)
        .map_err(|e| crate::Error::Config(format!("{flag} {}: {e}", path.display())))
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        Err("must be greater than zero".into())
    } else {
        Ok(d)
    }
}

fn positive_size(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    if n == 0 {
        Err("must be greater than zero".into())
    } else {
        Ok(n)
    }
}

impl ServeArgs {
    /// Fills in what flags and environment left at their defaults from the `--config` file,
    /// if one is named. `matches` are the ones these arguments were parsed from.
    ///
    /// The JWT key is one setting with three spellings (`--jwt-secret`, `--jwt-secret-file`,
    /// `--jwt-public-key`): a spelling given as a flag drops those only set in the environment,
    /// and one given by either drops the file's.
    pub fn with_file(mut self, matches: &clap::ArgMatches) -> Result<Self, crate::Error> {
        use clap::parser::ValueSource::CommandLine;
        let from_flag = |id| matches.value_source(id) == Some(CommandLine);
        if ["jwt_secret", "jwt_secret_file", "jwt_public_key"]
            .into_iter()
            .any(from_flag)
        {
            if !from_flag("jwt_secret") {
                self.jwt_secret = None;
            }
            if !from_flag("jwt_secret_file") {
                self.jwt_secret_file = None;
            }
            if !from_flag("jwt_public_key") {
                self.jwt_public_key = None;
            }
        }
        if let Some(path) = self.config.clone() {
            crate::config_file::load(&path)?.apply(&mut self, matches);
        }
        Ok(self)
    }

    /// The effective settings as TOML, secrets redacted (what `shardcast config` prints).
    pub fn to_toml(&self) -> String {
        crate::config_file::FileConfig::effective(self).to_toml()
    }

    /// Turns parsed flags into a validated configuration.
    pub fn into_config(self) -> Result<Config, crate::Error> {
        let jwt_keys = [
            self.jwt_secret.is_some().then_some("--jwt-secret"),
            self.jwt_secret_file
                .is_some()
                .then_some("--jwt-secret-file"),
            self.jwt_public_key.is_some().then_some("--jwt-public-key"),
        ];
        let jwt_keys: Vec<&str> = jwt_keys.into_iter().flatten().collect();
        if jwt_keys.len() > 1 {
            return Err(crate::Error::Config(format!(
                "{} set the same JWT key: give one of them",
                jwt_keys.join(" and ")
            )));
        }
        let jwt = if let Some(secret) = self.jwt_secret {
            Some(JwtKey::Hs256(Secret::new(secret.into_bytes())))
        } else if let Some(path) = &self.jwt_secret_file {
            let secret = read_file("--jwt-secret-file", path)?;
            let secret = secret.trim_end_matches(['\r', '\n']);
            Some(JwtKey::Hs256(Secret::new(secret.as_bytes())))
        } else if let Some(path) = &self.jwt_public_key {
            let pem = std::fs::read(path).map_err(|e| {
                crate::Error::Config(format!("--jwt-public-key {}: {e}", path.display()))
            })?;
            Some(JwtKey::PublicKeyPem(pem))
        } else {
            None
        };
        let mut api_keys: Vec<Secret> = self
            .api_key
            .into_iter()
            .map(|k| Secret::new(k.into_bytes()))
            .collect();
        if let Some(path) = &self.api_key_file {
            let text = read_file("--api-key-file", path)?;
            api_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| Secret::new(l.as_bytes())),
            );
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig { cert, key }),
            (None, None) => None,
            (Some(_), None) => return Err(crate::Error::Config(
                "--tls-cert needs --tls-key (flag, SHARDCAST_TLS_KEY or tls-key in the --config file)".into(),
            )),
            (None, Some(_)) => return Err(crate::Error::Config(
                "--tls-key needs --tls-cert (flag, SHARDCAST_TLS_CERT or tls-cert in the --config file)".into(),
            )),
        };
        let config = Config {
            listen: self.listen,
            shards: self.shards.map_or_else(crate::default_shards, usize::from),
            ping_interval: self.ping_interval,
            pong_timeout: self.pong_timeout,
            max_message_bytes: self.max_message_bytes,
            send_queue_bytes: self.send_queue_bytes,
            write_timeout: self.write_timeout,
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            client_publish: self.client_publish,
            drain_timeout: self.drain_timeout,
            drain_delay: self.drain_delay,
            metrics_listen: self.metrics_listen,
            log_format: self.log_format,
            handshake_timeout: self.handshake_timeout,
            max_connections_per_ip: self
                .max_connections_per_ip
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            client_publish_rate: self.client_publish_rate,
            auth: AuthConfig {
                jwt,
                api_keys,
                allowed_origins: self.allowed_origin,
            },
            tls,
            bus: self.bus.map(|url| BusConfig {
                prefix: self.bus_prefix,
                ..BusConfig::new(url)
            }),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags of `args`, as `main` resolves them (with any `--config` file), with the
    /// `SHARDCAST_*` variables of the shell running the tests ignored.
    fn serve_args(args: &[&str]) -> Result<ServeArgs, String> {
        use clap::{CommandFactory, FromArgMatches};
        let no_env = |a: clap::Arg| a.env(None::<&'static str>);
        let matches = Cli::command()
            .mut_args(no_env)
            .mut_subcommands(|s| s.mut_args(no_env))
            .try_get_matches_from(std::iter::once("shardcast").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        let sub = matches.subcommand().map_or(&matches, |(_, m)| m);
        let serve = match cli.command {
            Some(Command::Serve(s) | Command::Config(s)) => s,
            None => cli.serve,
            Some(other) => return Err(format!("not serve: {other:?}")),
        };
        serve.with_file(sub).map_err(|e| e.to_string())
    }

    fn parse(args: &[&str]) -> Result<Config, String> {
        serve_args(args)?.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn no_arguments_gives_the_embedded_defaults() {
        // The values of the README's table, spelled out rather than taken from `Config::default`.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let documented = Config {
            listen: "127.0.0.1:8080".parse().expect("address"),
            shards: cores.min(256),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            max_message_bytes: 65536,
            send_queue_bytes: 1024 * 1024,
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
            auth: AuthConfig {
                jwt: None,
                api_keys: Vec::new(),
                allowed_origins: Vec::new(),
            },
            tls: None,
            bus: None,
        };
        assert_eq!(parse(&[]).unwrap(), documented);
        assert_eq!(parse(&["serve"]).unwrap(), documented);
        assert_eq!(Config::default(), documented);
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write test file");
        path.to_str().expect("utf-8 path").to_string()
    }

    fn keys(c: &Config) -> Vec<&[u8]> {
        c.auth.api_keys.iter().map(Secret::expose).collect()
    }

    #[test]
    fn api_keys_come_from_repeated_flags_and_a_file() {
        let c = parse(&["--api-key", "one", "--api-key", "two"]).unwrap();
        assert_eq!(keys(&c), [&b"one"[..], b"two"]);
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = write(
            &dir,
            "keys",
            "# publishers\nfile-one\n\n  file-two  \r\n#retired-key\n",
        );
        let c = parse(&["--api-key", "flag", "--api-key-file", &file]).unwrap();
        assert_eq!(keys(&c), [&b"flag"[..], b"file-one", b"file-two"]);
        let err = parse(&["--api-key-file", "/nonexistent/keys"]).unwrap_err();
        assert!(err.contains("--api-key-file /nonexistent/keys"), "{err}");
    }

    #[test]
    fn the_jwt_secret_file_loses_its_trailing_newline_only() {
        let dir = tempfile::tempdir().expect("temporary directory");
        for (text, secret) in [
            ("s3cret\n", &b"s3cret"[..]),
            ("s3cret\r\n", b"s3cret"),
            ("s3cret", b"s3cret"),
            (" s3 cret \n", b" s3 cret "),
        ] {
            let file = write(&dir, "secret", text);
            let c = parse(&["--jwt-secret-file", &file]).unwrap();
            assert_eq!(
                c.auth.jwt,
                Some(JwtKey::Hs256(Secret::new(secret))),
                "{text:?}"
            );
        }
    }

    #[test]
    fn a_jwt_flag_replaces_every_jwt_key_of_the_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let secret = write(&dir, "secret", "from-flag\n");
        let config = write(&dir, "shardcast.toml", "jwt-secret = \"from-file\"\n");
        let c = parse(&["--config", &config, "--jwt-secret-file", &secret]).unwrap();
        assert_eq!(
            c.auth.jwt,
            Some(JwtKey::Hs256(Secret::new(&b"from-flag"[..])))
        );
        let c = parse(&["--config", &config]).unwrap();
        assert_eq!(
            c.auth.jwt,
            Some(JwtKey::Hs256(Secret::new(&b"from-file"[..])))
        );
        let err = parse(&["--jwt-secret", "a", "--jwt-public-key", "/k.pem"]).unwrap_err();
        assert!(err.contains("--jwt-secret and --jwt-public-key"), "{err}");
    }

    #[test]
    fn the_tls_pair_may_come_half_from_the_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = write(&dir, "shardcast.toml", "tls-key = \"/etc/key.pem\"\n");
        let args = serve_args(&["--config", &config, "--tls-cert", "/etc/cert.pem"]).unwrap();
        assert_eq!(args.tls_cert, Some(PathBuf::from("/etc/cert.pem")));
        assert_eq!(args.tls_key, Some(PathBuf::from("/etc/key.pem")));
        let err = parse(&["--tls-cert", "/etc/cert.pem"]).unwrap_err();
        assert!(err.contains("--tls-cert needs --tls-key"), "{err}");
        let err = parse(&["--config", &config]).unwrap_err();
        assert!(err.contains("--tls-key needs --tls-cert"), "{err}");
    }

    #[test]
    fn flags_parse_units() {
        let c = parse(&[
            "serve",
            "--ping-interval",
            "250ms",
            "--send-queue-bytes",
            "2MiB",
            "--client-publish",
            "false",
        ])
        .unwrap();
        assert_eq!(c.ping_interval, Duration::from_millis(250));
        assert_eq!(c.send_queue_bytes, 2 << 20);
        assert!(!c.client_publish);
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        for args in [
            &["--ping-interval", "soon"][..],
            &["--shards", "0"],
            &["--max-message-bytes", "0"],
            &["--listen", "nowhere"],
            &["--bus", "redis://nowhere"],
            &["--bus", "kafka://127.0.0.1:9092"],
            &["--bus", "nats://127.0.0.1:4222", "--bus-prefix", "a..b"],
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(args[0]), "{err}");
        }
        assert!(
            parse(&["--send-queue-bytes", "1KiB"])
                .unwrap_err()
                .contains("--send-queue-bytes")
        );
    }
}
