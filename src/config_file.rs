//! The `--config` TOML file and the TOML `shardcast config` prints, both derived from the
//! settings' declarations on [`Config`]: a key is a flag's long name, and its value is checked
//! by that flag's own value parser, so this file names no setting. Values are turned into the
//! flag's text form (strings as they are; numbers and booleans written out; arrays element by
//! element), so `max-message-bytes = 65536` and `max-message-bytes = "64KiB"` both work.
//!
//! Not here: which source wins (`cli.rs`), the settings themselves and the checks between
//! them (`shardcast_server`'s `config.rs`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use clap::{ArgAction, ArgMatches, Args};
use toml::{Spanned, Value};

use crate::{BusUrl, Config, Error, JWT_KEY_SPELLINGS, jwt_spellings_in_force};

/// One key of the file, checked: the setting's id and flag name, its values as flag text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The id of the setting's argument (`ping_interval`).
    pub id: String,
    /// The flag's long name, which is also the key (`ping-interval`).
    pub long: String,
    /// The values as they would be written after the flag.
    pub values: Vec<String>,
}

/// The settings' arguments, in declaration order: what keys may be, and how values parse.
fn settings() -> clap::Command {
    Config::augment_args(clap::Command::new("shardcast"))
}

/// Reads and checks `path`. Errors name the file, the line and the key.
pub fn load(path: &Path) -> Result<Vec<Entry>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("failed to read {}: {e}", path.display())))?;
    parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Parses and checks TOML text, keys in file order; an error says
/// `line N, key K: what is wrong`.
pub fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let table: BTreeMap<Spanned<String>, Spanned<Value>> = toml::from_str(text).map_err(|e| {
        let Some(span) = e.span() else {
            return e.message().to_string();
        };
        let line_no = line_of(span.start);
        let line = text.lines().nth(line_no - 1).unwrap_or("");
        let key = line.split('=').next().unwrap_or("").trim();
        let key = key.trim_start_matches('[').trim_end_matches(']');
        format!("line {line_no}, key `{key}`: {}", e.message())
    })?;
    let mut keys: Vec<_> = table.into_iter().collect();
    keys.sort_by_key(|(key, _)| key.span().start);
    let cmd = settings();
    let mut entries = Vec::with_capacity(keys.len());
    // The JWT key's spellings seen so far, with their lines: one setting, so one at most.
    let mut jwt: Option<(usize, &str)> = None;
    for (key, value) in &keys {
        let line = line_of(key.span().start);
        let at = |what: String| format!("line {line}, key `{}`: {what}", key.get_ref());
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.get_ref().as_str()))
            .ok_or_else(|| {
                let known: Vec<String> = cmd
                    .get_arguments()
                    .filter_map(|a| Some(format!("`{}`", a.get_long()?)))
                    .collect();
                at(format!(
                    "unknown field `{}`, expected one of {}",
                    key.get_ref(),
                    known.join(", ")
                ))
            })?;
        let id = arg.get_id().as_str();
        if JWT_KEY_SPELLINGS.contains(&id) {
            if let Some((first_line, first)) = jwt {
                return Err(at(format!(
                    "one JWT key at most, and `{first}` is set on line {first_line}"
                )));
            }
            jwt = Some((line, key.get_ref()));
        }
        let values = flag_text(value.get_ref(), multiple(arg)).map_err(at)?;
        // The flag alone, parsed with its own value parser: the one place its checks live.
        let check = clap::Command::new("shardcast").arg(arg.clone().env(None::<&str>));
        for v in &values {
            check
                .clone()
                .try_get_matches_from([OsString::from("shardcast"), flag(key.get_ref(), v)])
                .map_err(|e| at(reason(&e, arg)))?;
        }
        entries.push(Entry {
            id: id.to_string(),
            long: key.get_ref().clone(),
            values,
        });
    }
    Ok(entries)
}

/// `--long=value`: a value given as a flag.
pub fn flag(long: &str, value: &str) -> OsString {
    OsString::from(format!("--{long}={value}"))
}

/// Whether the setting takes a list (a repeatable flag).
fn multiple(arg: &clap::Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
}

/// A TOML value as the flag's text: one string, or one per element for a list.
fn flag_text(value: &Value, list: bool) -> Result<Vec<String>, String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(_) | Value::Float(_) | Value::Boolean(_) | Value::Datetime(_) => {
            Ok(v.to_string())
        }
        Value::Array(_) | Value::Table(_) => Err(format!("expected a value, got {v}")),
    };
    match value {
        Value::Array(items) if list => items.iter().map(scalar).collect(),
        Value::Array(_) => Err("expected one value, got a list".into()),
        v => Ok(vec![scalar(v)?]),
    }
}

/// What a value parser found wrong, without clap's framing (the caller names line and key).
fn reason(e: &clap::Error, arg: &clap::Arg) -> String {
    if let Some(source) = std::error::Error::source(e) {
        return source.to_string();
    }
    let possible: Vec<String> = arg
        .get_possible_values()
        .iter()
        .map(|v| format!("{:?}", v.get_name()))
        .collect();
    let first = e.to_string();
    let first = first.lines().next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    if possible.is_empty() {
        first.to_string()
    } else {
        format!("{first}; expected one of {}", possible.join(", "))
    }
}

/// The effective settings in `matches` as a `--config` file, in declaration order: every
/// setting with a value, and every list, even empty. Secrets (the arguments whose variable
/// values are hidden) and the credentials in broker URLs are replaced by `<redacted>`; numbers and
/// booleans are written bare. The output loads back as a file.
pub fn to_toml(matches: &ArgMatches) -> String {
    let in_force = jwt_spellings_in_force(matches);
    let mut out = String::new();
    for arg in settings().get_arguments() {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        if JWT_KEY_SPELLINGS.contains(&id) && !in_force.contains(&id) {
            continue; // replaced by a spelling of a stronger source
        }
        let values: Vec<Value> = matches
            .get_raw(id)
            .into_iter()
            .flatten()
            .map(|raw| {
                let raw = raw.to_string_lossy();
                if arg.is_hide_env_values_set() {
                    Value::String("<redacted>".into())
                } else {
                    typed(&redact_userinfo(&raw))
                }
            })
            .collect();
        let value = if multiple(arg) {
            Value::Array(values)
        } else {
            match values.into_iter().next() {
                Some(v) => v,
                None => continue,
            }
        };
        out.push_str(&format!("{long} = {value}\n"));
    }
    out
}

/// A flag's text as the TOML value that reads back the same: bare if it is a whole number or
/// a boolean, else a string.
fn typed(raw: &str) -> Value {
    if let Ok(n) = raw.parse::<i64>() {
        Value::Integer(n)
    } else if let Ok(b) = raw.parse::<bool>() {
        Value::Boolean(b)
    } else {
        Value::String(raw.to_string())
    }
}

/// A broker URL's credentials become `<redacted>` (`redis://<redacted>@host`); any other
/// value is kept.
fn redact_userinfo(raw: &str) -> String {
    raw.parse::<BusUrl>()
        .map_or_else(|_| raw.to_string(), |url| url.redacted())
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

    /// The file `text`'s value for `key`, as flag text.
    fn value(text: &str, key: &str) -> Option<Vec<String>> {
        let entries = parse(text).unwrap();
        entries
            .into_iter()
            .find(|e| e.long == key)
            .map(|e| e.values)
    }

    #[test]
    fn the_bus_url_is_checked_and_written_back_redacted() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = dir.path().join("bus.toml");
        let text = "bus = \"redis://:pw@127.0.0.1:6379\"\nbus-prefix = \"app\"\n";
        std::fs::write(&file, text).expect("write test file");
        let no_env = |a: clap::Arg| a.env(None::<&'static str>);
        let cmd = <crate::cli::Cli as clap::CommandFactory>::command().mut_args(no_env);
        let argv = ["shardcast".into(), "--config".into(), file.into_os_string()];
        let resolved = crate::cli::resolve(cmd, argv.to_vec()).unwrap();
        let bus = resolved.config.bus.as_ref().expect("a bus");
        assert_eq!(bus.url.kind(), crate::BusKind::Redis);
        assert_eq!(bus.prefix, "app");
        let text = resolved.to_toml();
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
        let text = "drain-delay = \"0s\"\ndrain-timeout = \"0s\"\nshards = 256\n";
        assert_eq!(value(text, "drain-delay"), Some(vec!["0s".to_string()]));
        assert_eq!(value(text, "shards"), Some(vec!["256".to_string()]));
    }

    #[test]
    fn one_jwt_key_at_most() {
        assert_eq!(
            value("jwt-secret-file = \"/run/secret\"\n", "jwt-secret-file"),
            Some(vec!["/run/secret".to_string()])
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
        let text = "max-message-bytes = 1024\nsend-queue-bytes = \"2MiB\"\n";
        assert_eq!(
            value(text, "max-message-bytes"),
            Some(vec!["1024".to_string()])
        );
        assert_eq!(
            value(text, "send-queue-bytes"),
            Some(vec!["2MiB".to_string()])
        );
        let err = parse("send-queue-bytes = \"lots\"\n").unwrap_err();
        assert!(err.starts_with("line 1, key `send-queue-bytes`"), "{err}");
    }
}
