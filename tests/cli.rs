//! The binary: bad values exit 2 with the flag named, a bind failure exits 1, SIGTERM exits 0.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn shardcast() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shardcast"));
    c.env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("SHARDCAST_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn bad_values_exit_with_code_2_and_name_the_flag() {
    for (args, needle) in [
        (&["--ping-interval", "soon"][..], "--ping-interval"),
        (
            &["serve", "--send-queue-bytes", "lots"],
            "--send-queue-bytes",
        ),
        (&["--shards", "0"], "--shards"),
        (&["--send-queue-bytes", "1KiB"], "--send-queue-bytes"),
        (
            &["--jwt-public-key", "/nonexistent/key.pem"],
            "--jwt-public-key",
        ),
        (
            &["--jwt-secret", "a", "--jwt-secret-file", "b"],
            "--jwt-secret",
        ),
        (&["--tls-cert", "/nonexistent/cert.pem"], "--tls-key"),
        (
            &[
                "--tls-cert",
                "/nonexistent/c.pem",
                "--tls-key",
                "/nonexistent/k.pem",
            ],
            "--tls-cert",
        ),
        (&["--allowed-origin", "example.com"], "--allowed-origin"),
        (&["--client-publish-rate", "0"], "--client-publish-rate"),
        (
            &["--max-connections-per-ip", "0"],
            "--max-connections-per-ip",
        ),
        (&["--bus", "redis://nowhere"], "--bus"),
        (&["--bus", "kafka://127.0.0.1:9092"], "invalid bus URL"),
        (
            &["--bus", "nats://127.0.0.1:4222", "--bus-prefix", "a..b"],
            "--bus-prefix",
        ),
    ] {
        let out = shardcast().args(args).output().expect("run shardcast");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = shardcast()
        .env("SHARDCAST_PONG_TIMEOUT", "never")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_address_in_use_exits_with_code_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = shardcast().args(["--listen", &addr]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("failed to bind {addr}")), "{err}");
}

#[test]
fn sigterm_drains_and_exits_0() {
    // The rest of stderr is dropped unread: a closed log pipe must not crash the server.
    let (mut child, rest) = start_binary(&["--drain-timeout", "1s", "--drain-delay", "0s"]);
    drop(rest);
    signal(&child, "-TERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}

/// Starts the binary with `args`, waits for its readiness line, and returns it with the rest
/// of its stderr.
fn start_binary(args: &[&str]) -> (std::process::Child, impl Iterator<Item = String>) {
    let (child, _, rest) = start_binary_with_head(args);
    (child, rest)
}

/// Like `start_binary`, also returning the lines up to and including the readiness line.
fn start_binary_with_head(
    args: &[&str],
) -> (
    std::process::Child,
    Vec<String>,
    impl Iterator<Item = String>,
) {
    let mut child = shardcast()
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shardcast");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let mut head = Vec::new();
    for line in lines.by_ref() {
        let ready = line.contains("shardcast listening");
        head.push(line);
        if ready {
            return (child, head, lines);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server never reported that it was listening: {head:?}");
}

fn signal(child: &std::process::Child, sig: &str) {
    let sent = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
}

#[test]
fn a_second_signal_ends_a_long_drain_at_once() {
    let (mut child, mut lines) = start_binary(&["--drain-delay", "1h", "--drain-timeout", "1h"]);
    signal(&child, "-TERM");
    assert!(
        lines.by_ref().any(|l| l.contains("draining")),
        "no drain announced"
    );
    signal(&child, "-INT");
    // With an hour of delay, only the second signal can end it; `wait` would hang otherwise,
    // so the test harness's timeout is the bound.
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    assert!(
        lines.any(|l| l.contains("second signal")),
        "the second signal was not acted on"
    );
}

#[test]
fn config_file_sits_between_environment_and_defaults() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("shardcast.toml");
    std::fs::write(
        &file,
        "ping-interval = \"7s\"\npong-timeout = \"8s\"\nwrite-timeout = \"9s\"\napi-key = [\"secret-key\"]\n",
    )
    .expect("write config");
    let out = shardcast()
        .args(["config", "--config"])
        .arg(&file)
        .args(["--write-timeout", "2s"])
        .env("SHARDCAST_PONG_TIMEOUT", "3s")
        .output()
        .expect("run shardcast config");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let toml = String::from_utf8_lossy(&out.stdout);
    for line in [
        "ping-interval = \"7s\"",
        "pong-timeout = \"3s\"",
        "write-timeout = \"2s\"",
        "drain-delay = \"5s\"",
        "api-key = [\"<redacted>\"]",
    ] {
        assert!(toml.contains(line), "{line} missing from:\n{toml}");
    }
    assert!(!toml.contains("secret-key"), "a secret was printed");
}

#[test]
fn a_bad_config_file_exits_2_naming_file_line_and_key() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "shards = 2\n\nping-intervall = \"1s\"\n").expect("write config");
    let out = shardcast()
        .arg("--config")
        .arg(&file)
        .output()
        .expect("run shardcast");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["bad.toml", "line 3", "ping-intervall"] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
}

#[test]
fn the_example_config_loads_and_round_trips() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/shardcast.example.toml");
    let out = shardcast()
        .args(["config", "--config", example])
        .output()
        .expect("run shardcast config");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // What `config` prints is itself a valid configuration file.
    let dir = tempfile::tempdir().expect("temporary directory");
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out.stdout).expect("write printed config");
    let again = shardcast()
        .args(["config", "--config"])
        .arg(&printed)
        .output()
        .expect("run shardcast config again");
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert_eq!(again.stdout, out.stdout);
}

#[test]
fn json_logs_carry_the_effective_configuration_without_secrets() {
    let (mut child, head, rest) = start_binary_with_head(&[
        "--log-format",
        "json",
        "--jwt-secret",
        "do-not-print-me",
        "--drain-delay",
        "0s",
    ]);
    signal(&child, "-TERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    let lines: Vec<String> = head.into_iter().chain(rest).collect();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        assert!(v.get("level").is_some(), "{line}");
    }
    let config = lines
        .iter()
        .find(|l| l.contains("effective configuration"))
        .expect("the configuration is logged");
    assert!(config.contains("redacted"), "{config}");
    assert!(lines.iter().all(|l| !l.contains("do-not-print-me")));
}
