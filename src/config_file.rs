//! The `--config` TOML file: its keys (the flags' long names), how its values fill in what the
//! command line and the environment left at their defaults, and the TOML that
//! `shardcast config` prints. Flag definitions live in `cli.rs`; validation in `config.rs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ArgMatches;
use clap::parser::ValueSource;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::Spanned;

use crate::Error;
use crate::bus::BusUrl;
use crate::cli::ServeArgs;
use crate::{LogFormat, MAX_DURATION, MAX_SHARDS, parse_duration, parse_size};

/// Every key the file may hold. Each is optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    #[serde(
        default,
        deserialize_with = "range::shards",
        skip_serializing_if = "Option::is_none"
    )]
    shards: Option<u16>,
    #[serde(
        default,
        deserialize_with = "duration::positive",
        serialize_with = "duration::serialize",
        skip_serializing_if = "Option::is_none"
    )]
    ping_interval: Option<Duration>,
    #[serde(
        default,
        deserialize_with = "duration::positive",
        serialize_with = "duration::serialize",
        skip_serializing_if = "Option::is_none"
    )]
    pong_timeout: Option<Duration>,
    #[serde(default, with = "size", skip_serializing_if = "Option::is_none")]
    max_message_bytes: Option<usize>,
    #[serde(default, with = "size", skip_serializing_if = "Option::is_none")]
    send_queue_bytes: Option<usize>,
    #[serde(
        default,
        deserialize_with = "duration::positive",
        serialize_with = "duration::serialize",
        skip_serializing_if = "Option::is_none"
    )]
    write_timeout: Option<Duration>,
    #[serde(
        default,
        deserialize_with = "range::positive",
        skip_serializing_if = "Option::is_none"
    )]
    max_connections: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_publish: Option<bool>,
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    drain_timeout: Option<Duration>,
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    drain_delay: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<SocketAddr>,
    #[serde(default, with = "log_format", skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
    #[serde(
        default,
        deserialize_with = "duration::positive",
        serialize_with = "duration::serialize",
        skip_serializing_if = "Option::is_none"
    )]
    handshake_timeout: Option<Duration>,
    #[serde(
        default,
        deserialize_with = "range::positive",
        skip_serializing_if = "Option::is_none"
    )]
    max_connections_per_ip: Option<u64>,
    #[serde(
        default,
        deserialize_with = "range::positive",
        skip_serializing_if = "Option::is_none"
    )]
    client_publish_rate: Option<u32>,
    // The JWT keys keep their place in the file, to name both lines when two are set.
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_secret: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_secret_file: Option<Spanned<PathBuf>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_public_key: Option<Spanned<PathBuf>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_origin: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<PathBuf>,
    #[serde(default, with = "bus_url", skip_serializing_if = "Option::is_none")]
    bus: Option<BusUrl>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bus_prefix: Option<String>,
}

/// Reads and parses `path`. Errors name the file, the line and the key.
pub fn load(path: &Path) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("failed to read {}: {e}", path.display())))?;
    parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Parses TOML text; an error says `line N, key K: what is wrong`.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let Some(span) = e.span() else {
            return e.message().to_string();
        };
        let line_no = line_of(span.start);
        let line = text.lines().nth(line_no - 1).unwrap_or("");
        let key = line.split('=').next().unwrap_or("").trim();
        let key = key.trim_start_matches('[').trim_end_matches(']');
        format!("line {line_no}, key `{key}`: {}", e.message())
    })?;
    // One setting with three spellings: a second one is an error, not a silent choice.
    let mut jwt: Vec<(usize, &str)> = [
        file.jwt_secret
            .as_ref()
            .map(|v| (v.span().start, "jwt-secret")),
        file.jwt_secret_file
            .as_ref()
            .map(|v| (v.span().start, "jwt-secret-file")),
        file.jwt_public_key
            .as_ref()
            .map(|v| (v.span().start, "jwt-public-key")),
    ]
    .into_iter()
    .flatten()
    .collect();
    jwt.sort_unstable();
    if let [(first_at, first), rest @ ..] = jwt.as_slice()
        && let Some((at, key)) = rest.first()
    {
        return Err(format!(
            "line {}, key `{key}`: one JWT key at most, and `{first}` is set on line {}",
            line_of(*at),
            line_of(*first_at),
        ));
    }
    Ok(file)
}

/// Whether the flag `id` took its value from neither the command line nor the environment.
fn unset(matches: &ArgMatches, id: &str) -> bool {
    !matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

impl FileConfig {
    /// Fills every field of `args` that `matches` says came from a default with the file's
    /// value, if it has one: flag, then environment, then file, then default.
    /// The JWT key is one setting: if a flag or variable gives any of its spellings, the
    /// file's is ignored.
    pub fn apply(self, args: &mut ServeArgs, matches: &ArgMatches) {
        macro_rules! fill {
            ($($field:ident),* $(,)?) => {$(
                if let Some(v) = self.$field {
                    if unset(matches, stringify!($field)) {
                        args.$field = v;
                    }
                }
            )*};
        }
        macro_rules! fill_opt {
            ($($field:ident),* $(,)?) => {$(
                if self.$field.is_some() && unset(matches, stringify!($field)) {
                    args.$field = self.$field;
                }
            )*};
        }
        fill!(
            listen,
            ping_interval,
            pong_timeout,
            max_message_bytes,
            send_queue_bytes,
            write_timeout,
            max_connections,
            client_publish,
            drain_timeout,
            drain_delay,
            log_format,
            handshake_timeout,
            api_key,
            allowed_origin,
            bus_prefix,
        );
        fill_opt!(
            shards,
            metrics_listen,
            max_connections_per_ip,
            client_publish_rate,
            api_key_file,
            tls_cert,
            tls_key,
            bus,
        );
        if ["jwt_secret", "jwt_secret_file", "jwt_public_key"]
            .into_iter()
            .all(|id| unset(matches, id))
        {
            // `parse` has made sure the file sets one of them at most.
            args.jwt_secret = self.jwt_secret.map(Spanned::into_inner);
            args.jwt_secret_file = self.jwt_secret_file.map(Spanned::into_inner);
            args.jwt_public_key = self.jwt_public_key.map(Spanned::into_inner);
        }
    }

    /// The effective settings of `args` as a file, secrets replaced by `<redacted>`.
    pub fn effective(args: &ServeArgs) -> Self {
        let redacted = || "<redacted>".to_string();
        Self {
            listen: Some(args.listen),
            shards: Some(
                args.shards
                    .unwrap_or_else(|| crate::default_shards() as u16),
            ),
            ping_interval: Some(args.ping_interval),
            pong_timeout: Some(args.pong_timeout),
            max_message_bytes: Some(args.max_message_bytes),
            send_queue_bytes: Some(args.send_queue_bytes),
            write_timeout: Some(args.write_timeout),
            max_connections: Some(args.max_connections),
            client_publish: Some(args.client_publish),
            drain_timeout: Some(args.drain_timeout),
            drain_delay: Some(args.drain_delay),
            metrics_listen: args.metrics_listen,
            log_format: Some(args.log_format),
            handshake_timeout: Some(args.handshake_timeout),
            max_connections_per_ip: args.max_connections_per_ip,
            client_publish_rate: args.client_publish_rate,
            jwt_secret: args.jwt_secret.as_ref().map(|_| unplaced(redacted())),
            jwt_secret_file: args.jwt_secret_file.clone().map(unplaced),
            jwt_public_key: args.jwt_public_key.clone().map(unplaced),
            api_key: Some(args.api_key.iter().map(|_| redacted()).collect()),
            api_key_file: args.api_key_file.clone(),
            allowed_origin: Some(args.allowed_origin.clone()),
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            bus: args.bus.clone(),
            bus_prefix: Some(args.bus_prefix.clone()),
        }
    }

    pub fn to_toml(&self) -> String {
        // Every field is a plain value or a list of strings, which TOML always represents.
        toml::to_string(self).unwrap_or_default()
    }
}

/// A value that comes from no place in a file.
fn unplaced<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}

/// Durations: any up to [`MAX_DURATION`], or with `positive`, greater than zero too: the
/// checks `--flag` values get from clap and `Config::validate`, here with the line named.
mod duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        let d = parse_duration(&s).map_err(serde::de::Error::custom)?;
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "must be at most 24h, got {s:?}"
            )));
        }
        Ok(Some(d))
    }

    pub fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match deserialize(d)? {
            Some(d) if d.is_zero() => Err(serde::de::Error::custom("must be greater than zero")),
            d => Ok(d),
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

mod size {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        let n = match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected bytes or a size like \"64KiB\""))?
        {
            Raw::Bytes(n) => usize::try_from(n).map_err(serde::de::Error::custom)?,
            Raw::Text(s) => parse_size(&s).map_err(serde::de::Error::custom)?,
        };
        if n == 0 {
            return Err(serde::de::Error::custom("must be greater than zero"));
        }
        Ok(Some(n))
    }

    pub fn serialize<S: Serializer>(v: &Option<usize>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u64(*n as u64),
            None => s.serialize_none(),
        }
    }
}

/// Whole numbers with the ranges their flags have.
mod range {
    use super::*;

    pub fn shards<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
        let n = u64::deserialize(d)?;
        match u16::try_from(n) {
            Ok(n) if (1..=MAX_SHARDS).contains(&usize::from(n)) => Ok(Some(n)),
            _ => Err(serde::de::Error::custom(format!(
                "must be between 1 and {MAX_SHARDS}, got {n}"
            ))),
        }
    }

    pub fn positive<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + PartialEq + Default,
    {
        let n = T::deserialize(d)?;
        if n == T::default() {
            return Err(serde::de::Error::custom("must be greater than zero, got 0"));
        }
        Ok(Some(n))
    }
}

/// A `--bus` URL; written back with its credentials redacted.
mod bus_url {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BusUrl>, D::Error> {
        String::deserialize(d)?
            .parse()
            .map(Some)
            .map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(v: &Option<BusUrl>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(url) => s.serialize_str(&url.redacted()),
            None => s.serialize_none(),
        }
    }
}

mod log_format {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LogFormat>, D::Error> {
        match String::deserialize(d)?.as_str() {
            "text" => Ok(Some(LogFormat::Text)),
            "json" => Ok(Some(LogFormat::Json)),
            other => Err(serde::de::Error::custom(format!(
                "expected \"text\" or \"json\", got {other:?}"
            ))),
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<LogFormat>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(f) => s.serialize_str(f.as_str()),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_line_and_the_key() {
        let err = parse("listen = \"127.0.0.1:1\"\nshards = \"many\"\n").unwrap_err();
        assert!(err.starts_with("line 2, key `shards`"), "{err}");
        let err = parse("\n\nping-interval = \"soon\"\n").unwrap_err();
        assert!(err.starts_with("line 3, key `ping-interval`"), "{err}");
        assert!(err.contains("invalid duration"), "{err}");
        let err = parse("shards = 2\nno-such-key = 1\n").unwrap_err();
        assert!(err.starts_with("line 2, key `no-such-key`"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn the_bus_url_is_checked_and_written_back_redacted() {
        let f = parse("bus = \"redis://:pw@127.0.0.1:6379\"\nbus-prefix = \"app\"\n").unwrap();
        assert_eq!(
            f.bus.as_ref().map(BusUrl::kind),
            Some(crate::BusKind::Redis)
        );
        assert_eq!(f.bus_prefix.as_deref(), Some("app"));
        let text = f.to_toml();
        assert!(text.contains("redis://<redacted>@127.0.0.1:6379"), "{text}");
        assert!(!text.contains("pw"), "{text}");
        let err = parse("bus = \"kafka://127.0.0.1:9092\"\n").unwrap_err();
        assert!(err.starts_with("line 1, key `bus`"), "{err}");
        assert!(err.contains("invalid bus URL"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_line_and_the_key() {
        for (text, key, what) in [
            ("shards = 0\n", "shards", "must be between 1 and 256, got 0"),
            (
                "shards = 257\n",
                "shards",
                "must be between 1 and 256, got 257",
            ),
            (
                "ping-interval = \"0s\"\n",
                "ping-interval",
                "must be greater than zero",
            ),
            (
                "pong-timeout = \"0ms\"\n",
                "pong-timeout",
                "must be greater than zero",
            ),
            (
                "write-timeout = \"0s\"\n",
                "write-timeout",
                "must be greater than zero",
            ),
            (
                "handshake-timeout = \"0s\"\n",
                "handshake-timeout",
                "must be greater than zero",
            ),
            (
                "drain-delay = \"25h\"\n",
                "drain-delay",
                "must be at most 24h",
            ),
            (
                "drain-timeout = \"2d\"\n",
                "drain-timeout",
                "must be at most 24h",
            ),
            (
                "ping-interval = \"25h\"\n",
                "ping-interval",
                "must be at most 24h",
            ),
            (
                "max-message-bytes = 0\n",
                "max-message-bytes",
                "must be greater than zero",
            ),
            (
                "send-queue-bytes = \"0KiB\"\n",
                "send-queue-bytes",
                "must be greater than zero",
            ),
            (
                "max-connections = 0\n",
                "max-connections",
                "must be greater than zero",
            ),
            (
                "max-connections-per-ip = 0\n",
                "max-connections-per-ip",
                "must be greater than zero",
            ),
            (
                "client-publish-rate = 0\n",
                "client-publish-rate",
                "must be greater than zero",
            ),
        ] {
            let text = format!("listen = \"127.0.0.1:1\"\n\n{text}");
            let err = parse(&text).unwrap_err();
            assert!(
                err.starts_with(&format!("line 3, key `{key}`: {what}")),
                "{text}: {err}"
            );
        }
        // Zero is a valid drain: close at once.
        let f = parse("drain-delay = \"0s\"\ndrain-timeout = \"0s\"\nshards = 256\n").unwrap();
        assert_eq!(f.drain_delay, Some(Duration::ZERO));
        assert_eq!(f.shards, Some(256));
    }

    #[test]
    fn one_jwt_key_at_most() {
        let f = parse("jwt-secret-file = \"/run/secret\"\n").unwrap();
        assert_eq!(
            f.jwt_secret_file.map(Spanned::into_inner),
            Some(PathBuf::from("/run/secret"))
        );
        let err =
            parse("jwt-public-key = \"/k.pem\"\nlisten = \"127.0.0.1:1\"\njwt-secret = \"s\"\n")
                .unwrap_err();
        assert_eq!(
            err,
            "line 3, key `jwt-secret`: one JWT key at most, and `jwt-public-key` is set on line 1"
        );
        let err = parse("jwt-secret = \"s\"\njwt-secret-file = \"/s\"\njwt-public-key = \"/k\"\n")
            .unwrap_err();
        assert!(err.starts_with("line 2, key `jwt-secret-file`"), "{err}");
    }

    /// The example's commented keys (`# key = value`) are real keys with valid values: each,
    /// uncommented on its own into the example, still parses.
    #[test]
    fn the_example_s_commented_keys_are_known_keys() {
        let example = include_str!("../docs/shardcast.example.toml");
        parse(example).unwrap();
        let commented: Vec<&str> = example
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.split_once(" = ").is_some_and(|(key, _)| {
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                })
            })
            .collect();
        assert!(
            commented.len() >= 10,
            "too few commented keys found: {commented:?}"
        );
        for line in commented {
            let text = example.replace(&format!("# {line}\n"), &format!("{line}\n"));
            assert_ne!(text, example);
            if let Err(e) = parse(&text) {
                panic!("uncommented `{line}`: {e}");
            }
        }
    }

    #[test]
    fn sizes_take_numbers_or_units() {
        let f = parse("max-message-bytes = 1024\nsend-queue-bytes = \"2MiB\"\n").unwrap();
        assert_eq!(f.max_message_bytes, Some(1024));
        assert_eq!(f.send_queue_bytes, Some(2 << 20));
    }
}
