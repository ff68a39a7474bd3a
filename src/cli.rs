//! The command line: subcommands, `--config`, and [`resolve`], which turns the arguments, the
//! `SHARDCAST_*` variables and the `--config` file into a [`Config`], in that order of
//! precedence. The settings themselves are declared once, on [`Config`] (the server crate's
//! `config.rs`); the file is read and printed by `config_file.rs`. Running the server lives in
//! `main.rs`, not here.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, Parser, Subcommand};

use crate::{Config, Error, JWT_KEY_SPELLINGS};

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

/// The id of `--config`.
const CONFIG: &str = "config";

/// Flags of `shardcast serve` (and `config`): `--config` and every setting of [`Config`]. Each
/// setting also reads the `SHARDCAST_*` variable named in its help, and may be set in the
/// `--config` file under the flag's name. Parsing keeps only the file's path: [`resolve`]
/// builds the configuration, once the file is read.
#[derive(Debug, Clone)]
pub struct ServeArgs {
    /// TOML file with the same keys as these flags; flags and variables take precedence.
    pub config: Option<PathBuf>,
}

impl Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let config = clap::Arg::new(CONFIG)
            .long("config")
            .env("SHARDCAST_CONFIG")
            .value_name("CONFIG")
            .value_parser(clap::value_parser!(PathBuf))
            .help(
                "TOML file with the same keys as these flags; flags and variables take precedence",
            );
        Config::augment_args(cmd.arg(config))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for ServeArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self {
            config: matches.get_one::<PathBuf>(CONFIG).cloned(),
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// A configuration and the matches it was built from (for `shardcast config`).
#[derive(Debug)]
pub struct Resolved {
    pub config: Config,
    matches: ArgMatches,
}

impl Resolved {
    /// The effective settings as TOML, secrets redacted (what `shardcast config` prints).
    pub fn to_toml(&self) -> String {
        crate::config_file::to_toml(&self.matches)
    }
}

/// Whether `id` was given by a flag or a variable (which both beat the file).
fn explicit(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// The serve flags' matches: those of `serve` or `config`, or the top level's.
fn serve_matches(matches: &ArgMatches) -> &ArgMatches {
    matches.subcommand().map_or(matches, |(_, m)| m)
}

/// Flags, variables, the `--config` file and defaults, in that order, as a configuration.
/// `cmd` is [`Cli`]'s command (tests take the variables off it); `argv` starts with the
/// program name and runs `serve` or `config` (or neither).
///
/// The file's values go in as flags for the settings that neither a flag nor a variable
/// set, so clap applies each setting's checks and defaults once. The JWT key is one setting:
/// if a flag or a variable gives any of its spellings, the file's is left out.
pub fn resolve(cmd: clap::Command, argv: Vec<OsString>) -> Result<Resolved, Error> {
    let message = |e: clap::Error| {
        let text = e.to_string();
        let text = text.trim();
        Error::Config(text.strip_prefix("error: ").unwrap_or(text).to_string())
    };
    let first = cmd
        .clone()
        .try_get_matches_from(argv.iter())
        .map_err(message)?;
    let given = serve_matches(&first);
    let mut argv = argv;
    if let Some(path) = given.get_one::<PathBuf>(CONFIG) {
        let jwt_given = JWT_KEY_SPELLINGS.iter().any(|id| explicit(given, id));
        for entry in crate::config_file::load(path)? {
            let jwt = JWT_KEY_SPELLINGS.contains(&entry.id.as_str());
            if explicit(given, &entry.id) || (jwt && jwt_given) {
                continue;
            }
            let flag = |v: &String| crate::config_file::flag(&entry.long, v);
            argv.extend(entry.values.iter().map(flag));
        }
    }
    let matches = cmd.try_get_matches_from(argv).map_err(message)?;
    let matches = serve_matches(&matches).clone();
    let config = Config::from_arg_matches(&matches).map_err(message)?;
    Ok(Resolved { config, matches })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    use clap::CommandFactory;

    use crate::{AuthConfig, JwtKey, LogFormat, Secret, TlsConfig};

    /// `args` resolved as `main` resolves them (with any `--config` file), with the
    /// `SHARDCAST_*` variables of the shell running the tests ignored.
    fn resolved(args: &[&str]) -> Result<Resolved, String> {
        let no_env = |a: clap::Arg| a.env(None::<&'static str>);
        let cmd = Cli::command()
            .mut_args(no_env)
            .mut_subcommands(|s| s.mut_args(no_env));
        let argv = std::iter::once("shardcast").chain(args.iter().copied());
        resolve(cmd, argv.map(OsString::from).collect()).map_err(|e| e.to_string())
    }

    /// The validated configuration of `args`.
    fn parse(args: &[&str]) -> Result<Config, String> {
        let config = resolved(args)?.config;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
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
                jwt_audience: Vec::new(),
                jwt_issuer: Vec::new(),
                jwks_refresh: Duration::from_secs(300),
                jwks_cooldown: Duration::from_secs(30),
                api_keys: Vec::new(),
                allowed_origins: Vec::new(),
            },
            tls: None,
            bus: None,
            demo: crate::Demo::Auto,
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
        let c = resolved(&["--config", &config, "--tls-cert", "/etc/cert.pem"]).unwrap();
        let tls = TlsConfig {
            cert: PathBuf::from("/etc/cert.pem"),
            key: PathBuf::from("/etc/key.pem"),
        };
        assert_eq!(c.config.tls, Some(tls));
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
