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
    let mut child = shardcast()
        .args(["--listen", "127.0.0.1:0", "--drain-timeout", "1s"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the readiness line rather than for time to pass.
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("shardcast listening"));
    assert!(ready, "server never reported that it was listening");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
