//! The binary: bad values exit 2 with the flag named, a bind failure exits 1, SIGTERM and
//! SIGINT drain and exit 0; configuration precedence, start-up warnings and defaults as
//! `shardcast config` and the logs show them. Every wait on the child is bounded.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite;

/// The longest a single step may take before a test fails instead of hanging: generous,
/// since the machine running the tests may be busy.
const WAIT: Duration = Duration::from_secs(10);

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

/// `shardcast config` with `args` and `env` only (nothing inherited).
fn config_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = shardcast();
    c.env_clear()
        .arg("config")
        .args(args)
        .envs(env.iter().copied());
    c
}

/// Runs `shardcast config` with `args` and `env` only; returns its TOML, failing the test
/// if it does not exit 0.
fn config_output(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run(&mut config_command(args, env));
    assert_eq!(out.status.code(), Some(0), "{args:?} {env:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs `cmd` expecting exit code 2; returns its stderr.
fn refused(cmd: &mut Command) -> String {
    let out = run(cmd);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{cmd:?}: {err}");
    err
}

/// `Command::output`, bounded by [`WAIT`].
fn run(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run shardcast");
    fn collect(mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = from.read_to_end(&mut v);
            v
        })
    }
    let stdout = collect(child.stdout.take().expect("piped stdout"));
    let stderr = collect(child.stderr.take().expect("piped stderr"));
    let status = wait_exit(&mut child, &format!("{cmd:?}"));
    std::process::Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Writes `text` to `name` in `dir`; returns the path.
fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write test file");
    path.to_str().expect("utf-8 path").to_string()
}

/// Whether the TOML `text` sets `key`.
fn sets(text: &str, key: &str) -> bool {
    text.lines().any(|l| l.starts_with(&format!("{key} = ")))
}

/// Waits at most [`WAIT`] for `child` to exit; kills it and fails the test otherwise.
fn wait_exit(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not exit within {WAIT:?} after {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running binary: its stderr lines arrive through a channel from a reader thread, so
/// every wait on them is bounded. Dropping it kills the process if it is still running.
struct Running {
    child: Child,
    lines: Option<mpsc::Receiver<String>>,
    /// The lines up to and including the readiness line.
    head: Vec<String>,
    /// The address the server reported it listens on.
    addr: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Already reaped: `kill` does nothing. Still running (a failed test): no leak.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on `127.0.0.1:0` with `args` and waits for its readiness line.
fn start_binary(args: &[&str]) -> Running {
    let mut cmd = shardcast();
    cmd.args(["--listen", "127.0.0.1:0"]).args(args);
    spawn(cmd)
}

/// Spawns `cmd` (logging at info) and waits at most [`WAIT`] for its readiness line.
fn spawn(mut cmd: Command) -> Running {
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shardcast");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Without a receiver, stop reading: the pipe closes, as a dropped log would.
            if tx.send(strip_ansi(&line)).is_err() {
                return;
            }
        }
    });
    let mut running = Running {
        child,
        lines: Some(rx),
        head: Vec::new(),
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let ready = running.until("the readiness line", |l| l.contains("shardcast listening"));
    running.addr = match serde_json::from_str::<serde_json::Value>(&ready) {
        Ok(json) => json["fields"]["addr"].as_str().unwrap_or("").to_string(),
        Err(_) => field(&ready, "addr").to_string(),
    }
    .parse()
    .unwrap_or_else(|e| panic!("no listening address in {ready}: {e}"));
    running
}

impl Running {
    /// The next log line for which `found` holds, at most [`WAIT`] away; every line read on
    /// the way is kept in `head` for the failure message.
    fn until(&mut self, what: &str, found: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        let lines = self.lines.as_ref().expect("stderr still read");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    self.head.push(line.clone());
                    if found(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("no log line with {what} ({e}); got: {:#?}", self.head),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let sent = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
    }

    /// Waits at most [`WAIT`] for the exit, and returns it with every log line after `head`.
    fn exit(&mut self, what: &str) -> (ExitStatus, Vec<String>) {
        let status = wait_exit(&mut self.child, what);
        let mut rest = Vec::new();
        if let Some(lines) = &self.lines {
            // The child is gone, so its stderr ends soon: the reader thread then hangs up.
            let deadline = Instant::now() + WAIT;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match lines.recv_timeout(left) {
                    Ok(line) => rest.push(line),
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => panic!("stderr never ended"),
                }
            }
        }
        (status, rest)
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }
}

/// The value of `name=` in a text log line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + name.len()
        + 2;
    line[start..].split_whitespace().next().unwrap_or("")
}

/// The text of a log line without its colours.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A TCP stream whose reads and writes fail after [`WAIT`] instead of blocking for ever.
fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    s.set_write_timeout(Some(WAIT)).expect("write timeout");
    s
}

type Ws = tungstenite::WebSocket<TcpStream>;

/// A WebSocket client on `path`; the server has registered it once this returns.
fn ws_client(server: &Running, path: &str) -> Ws {
    let (ws, res) =
        tungstenite::client(server.url(path), connect(server.addr)).expect("websocket handshake");
    assert_eq!(res.status(), 101);
    ws
}

/// Reads until the server's close frame, answers it, reads to the end; returns the code.
fn close_code(ws: &mut Ws) -> u16 {
    let code = loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(frame)) => {
                break frame.map(|f| u16::from(f.code)).expect("a close code");
            }
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    // The reply goes out with the next read, which then sees the end of the connection.
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(tungstenite::Error::Io(e))
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut =>
            {
                break;
            }
            Err(e) => panic!("after the close frame: {e}"),
        }
    }
    code
}

/// An upgraded connection that will never read or write again (its upgrade response is
/// read byte by byte, so nothing after it is consumed).
fn stuck_client(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = connect(addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .expect("write upgrade");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("read upgrade response");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// One HTTP/1.1 request with `Connection: close`; returns the status.
fn http(addr: SocketAddr, request: &str) -> u16 {
    let mut s = connect(addr);
    s.write_all(request.as_bytes()).expect("write request");
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
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
            "--jwt-secret and --jwt-secret-file",
        ),
        (&["--tls-cert", "/nonexistent/cert.pem"], "--tls-key"),
        (&["--tls-key", "/nonexistent/key.pem"], "--tls-cert"),
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
        let err = refused(shardcast().args(args));
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    refused(shardcast().env("SHARDCAST_PONG_TIMEOUT", "never"));
}

#[test]
fn an_address_in_use_exits_with_code_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let addr = taken.local_addr().expect("the bound address").to_string();
    let out = run(shardcast().args(["--listen", &addr]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("failed to bind {addr}")), "{err}");
}

#[test]
fn sigterm_drains_and_exits_0() {
    // The rest of stderr is dropped unread: a closed log pipe must not crash the server.
    let mut server = start_binary(&["--drain-timeout", "1s", "--drain-delay", "0s"]);
    server.lines = None;
    server.signal("-TERM");
    let (status, _) = server.exit("SIGTERM");
    assert_eq!(status.code(), Some(0));
}

/// A drain that starts at once and lasts 2 s, with no pings in the way.
const SHORT_DRAIN: &[&str] = &[
    "--drain-delay",
    "0s",
    "--drain-timeout",
    "2s",
    "--ping-interval",
    "1h",
];

/// One first signal with `clients` connected: each gets 1001, the process logs the drain and
/// exits 0, and nothing is taken for a second signal.
fn first_signal_drains(signal: &str, name: &str, clients: usize) {
    let mut server = start_binary(SHORT_DRAIN);
    let mut clients: Vec<Ws> = (0..clients)
        .map(|_| ws_client(&server, "/ws/news"))
        .collect();
    server.signal(signal);
    for ws in &mut clients {
        assert_eq!(close_code(ws), 1001);
    }
    let (status, rest) = server.exit(name);
    assert_eq!(status.code(), Some(0), "{rest:#?}");
    let log: Vec<&String> = server.head.iter().chain(&rest).collect();
    for needle in [
        &format!("{name} received") as &str,
        "draining",
        "drain finished",
    ] {
        assert!(log.iter().any(|l| l.contains(needle)), "{needle}: {log:#?}");
    }
    assert!(
        !log.iter().any(|l| l.contains("second signal")),
        "one {name} is a drain, not an immediate stop: {log:#?}"
    );
}

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_0() {
    first_signal_drains("-TERM", "SIGTERM", 3);
}

#[test]
fn a_client_that_never_answers_the_close_is_dropped_at_the_drain_timeout() {
    let mut server = start_binary(SHORT_DRAIN);
    let mut stuck = stuck_client(server.addr, "/ws/news");
    let mut polite = ws_client(&server, "/ws/news");
    let signalled = Instant::now();
    server.signal("-TERM");
    assert_eq!(close_code(&mut polite), 1001);
    let (status, rest) = server.exit("SIGTERM, the drain timeout past");
    assert_eq!(status.code(), Some(0), "{rest:#?}");
    // The stuck client kept the drain open until its deadline, two seconds after the signal.
    let took = signalled.elapsed();
    assert!(took >= Duration::from_millis(1900), "exited after {took:?}");
    // It was sent its close 1001 like the others, then the connection ended.
    let mut got = Vec::new();
    stuck.read_to_end(&mut got).expect("read to the end");
    assert!(got.len() >= 4, "{got:?}");
    assert_eq!(got[0], 0x88, "a final close frame: {got:?}");
    assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1001, "{got:?}");
}

#[test]
fn sigint_first_drains_like_sigterm() {
    first_signal_drains("-INT", "SIGINT", 2);
}

#[test]
fn a_second_signal_ends_a_long_drain_at_once() {
    let mut server = start_binary(&["--drain-delay", "1h", "--drain-timeout", "1h"]);
    server.signal("-TERM");
    server.until("the drain", |l| l.contains("draining"));
    server.signal("-INT");
    // With an hour of delay, only the second signal can end it within the bound.
    let (status, rest) = server.exit("the second signal");
    assert_eq!(status.code(), Some(0));
    assert!(
        rest.iter().any(|l| l.contains("second signal")),
        "the second signal was not acted on: {rest:#?}"
    );
}

#[test]
fn config_file_sits_between_environment_and_defaults() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = write(
        &dir,
        "shardcast.toml",
        "ping-interval = \"7s\"\npong-timeout = \"8s\"\nwrite-timeout = \"9s\"\napi-key = [\"secret-key\"]\n",
    );
    let toml = config_output(
        &["--config", &file, "--write-timeout", "2s"],
        &[("SHARDCAST_PONG_TIMEOUT", "3s")],
    );
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
fn for_one_key_the_flag_beats_the_environment_beats_the_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = write(
        &dir,
        "shardcast.toml",
        "ping-interval = \"7s\"\napi-key = [\"f1\", \"f2\", \"f3\"]\n",
    );
    let env = [
        ("SHARDCAST_PING_INTERVAL", "8s"),
        ("SHARDCAST_API_KEY", "e1,e2"),
    ];
    let all = config_output(
        &[
            "--config",
            &file,
            "--ping-interval",
            "9s",
            "--api-key",
            "a1",
        ],
        &env,
    );
    assert!(all.contains("ping-interval = \"9s\""), "{all}");
    assert!(all.contains("api-key = [\"<redacted>\"]"), "{all}");
    let no_flag = config_output(&["--config", &file], &env);
    assert!(no_flag.contains("ping-interval = \"8s\""), "{no_flag}");
    assert!(
        no_flag.contains("api-key = [\"<redacted>\", \"<redacted>\"]"),
        "{no_flag}"
    );
    let file_only = config_output(&["--config", &file], &[]);
    assert!(file_only.contains("ping-interval = \"7s\""), "{file_only}");
    assert!(
        file_only.contains("api-key = [\"<redacted>\", \"<redacted>\", \"<redacted>\"]"),
        "{file_only}"
    );
}

#[test]
fn the_jwt_key_is_one_setting_across_flag_environment_and_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ec key");
    let pem = write(&dir, "jwt.pem", &key.public_key_pem());
    let file = write(&dir, "shardcast.toml", "jwt-secret = \"file-secret\"\n");
    // A flag of another spelling replaces the file's key: the file does not win.
    let toml = config_output(&["--config", &file, "--jwt-public-key", &pem], &[]);
    assert!(sets(&toml, "jwt-public-key"), "{toml}");
    assert!(
        !sets(&toml, "jwt-secret"),
        "the file's key survived:\n{toml}"
    );
    // So does a variable.
    let toml = config_output(&["--config", &file], &[("SHARDCAST_JWT_PUBLIC_KEY", &pem)]);
    assert!(
        sets(&toml, "jwt-public-key") && !sets(&toml, "jwt-secret"),
        "{toml}"
    );
    // And a flag replaces a variable of another spelling.
    let toml = config_output(
        &["--jwt-public-key", &pem],
        &[("SHARDCAST_JWT_SECRET", "env-secret")],
    );
    assert!(
        sets(&toml, "jwt-public-key") && !sets(&toml, "jwt-secret"),
        "{toml}"
    );
    // Alone, the file's key holds.
    let toml = config_output(&["--config", &file], &[]);
    assert!(toml.contains("jwt-secret = \"<redacted>\""), "{toml}");
    assert!(
        !sets(&toml, "jwt-public-key") && !toml.contains("file-secret"),
        "{toml}"
    );
    // Two keys in one file, or in the environment, are refused.
    let two = write(
        &dir,
        "two.toml",
        &format!("jwt-secret = \"s\"\njwt-public-key = {pem:?}\n"),
    );
    let err = refused(&mut config_command(&["--config", &two], &[]));
    for needle in [
        "two.toml: line 2",
        "`jwt-public-key`",
        "`jwt-secret`",
        "line 1",
    ] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    let err = refused(&mut config_command(
        &[],
        &[
            ("SHARDCAST_JWT_SECRET", "s"),
            ("SHARDCAST_JWT_PUBLIC_KEY", &pem),
        ],
    ));
    assert!(err.contains("--jwt-secret and --jwt-public-key"), "{err}");
}

#[test]
fn the_tls_certificate_and_key_may_come_from_different_sources() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("generate a certificate");
    let cert = write(&dir, "cert.pem", &ck.cert.pem());
    let key = write(&dir, "key.pem", &ck.signing_key.serialize_pem());
    let key_file = write(&dir, "key.toml", &format!("tls-key = {key:?}\n"));
    let toml = config_output(&["--config", &key_file, "--tls-cert", &cert], &[]);
    assert!(toml.contains(&format!("tls-cert = {cert:?}")), "{toml}");
    assert!(toml.contains(&format!("tls-key = {key:?}")), "{toml}");
    let cert_file = write(&dir, "cert.toml", &format!("tls-cert = {cert:?}\n"));
    let toml = config_output(&["--config", &cert_file], &[("SHARDCAST_TLS_KEY", &key)]);
    assert!(sets(&toml, "tls-cert") && sets(&toml, "tls-key"), "{toml}");
    // Halves that do not belong together are caught.
    let other = rcgen::KeyPair::generate().expect("key");
    let other = write(&dir, "other.pem", &other.serialize_pem());
    let err = refused(&mut config_command(
        &["--config", &cert_file, "--tls-key", &other],
        &[],
    ));
    assert!(err.contains("--tls-key does not fit --tls-cert"), "{err}");
    // A half with no other half anywhere is refused with the missing one named.
    let err = refused(&mut config_command(&["--config", &cert_file], &[]));
    assert!(err.contains("--tls-cert needs --tls-key"), "{err}");
}

#[test]
fn a_bad_config_file_exits_2_naming_file_line_and_key() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = write(&dir, "bad.toml", "shards = 2\n\nping-intervall = \"1s\"\n");
    let err = refused(shardcast().arg("--config").arg(&file));
    for needle in ["bad.toml", "line 3", "ping-intervall"] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
}

#[test]
fn out_of_range_values_in_the_file_name_file_line_and_key() {
    let dir = tempfile::tempdir().expect("temporary directory");
    for (line, expected) in [
        (
            "shards = 0",
            "key `shards`: must be between 1 and 256, got 0",
        ),
        (
            "ping-interval = \"0s\"",
            "key `ping-interval`: must be greater than zero",
        ),
        (
            "max-message-bytes = 0",
            "key `max-message-bytes`: must be greater than zero",
        ),
        (
            "send-queue-bytes = \"0MiB\"",
            "key `send-queue-bytes`: must be greater than zero",
        ),
        (
            "max-connections = 0",
            "key `max-connections`: must be greater than zero",
        ),
    ] {
        let file = write(
            &dir,
            "shardcast.toml",
            &format!("listen = \"127.0.0.1:0\"\n\n{line}\n"),
        );
        let err = refused(shardcast().arg("--config").arg(&file));
        let expected = format!("shardcast.toml: line 3, {expected}");
        assert!(err.contains(&expected), "{expected} missing from: {err}");
    }
}

#[test]
fn credentials_from_files_and_repeated_flags_are_printed_redacted() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let keys = write(&dir, "api-keys", "# publishers\nfile-key-1\n\nfile-key-2\n");
    let secret = write(&dir, "jwt-secret", "file-jwt-secret\n");
    let toml = config_output(
        &[
            "--api-key",
            "flag-key-1",
            "--api-key",
            "flag-key-2",
            "--api-key-file",
            &keys,
            "--jwt-secret-file",
            &secret,
        ],
        &[],
    );
    for line in [
        "api-key = [\"<redacted>\", \"<redacted>\"]".to_string(),
        format!("api-key-file = {keys:?}"),
        format!("jwt-secret-file = {secret:?}"),
    ] {
        assert!(toml.contains(&line), "{line} missing from:\n{toml}");
    }
    for secret in ["flag-key", "file-key", "file-jwt-secret"] {
        assert!(!toml.contains(secret), "{secret} printed:\n{toml}");
    }
}

#[test]
fn api_keys_from_a_file_let_their_holders_publish() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let keys = write(
        &dir,
        "api-keys",
        "# publishers\nfile-key-1\n\n  file-key-2  \n",
    );
    let mut server = start_binary(&["--api-key-file", &keys, "--drain-delay", "0s"]);
    let publish = |auth: &str| {
        http(
            server.addr,
            &format!(
                "POST /publish/news HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: text/plain\r\n\
                 Content-Length: 2\r\nConnection: close\r\n\r\nhi"
            ),
        )
    };
    assert_eq!(publish(""), 401);
    assert_eq!(publish("Authorization: Bearer # publishers\r\n"), 401);
    assert_eq!(publish("Authorization: Bearer file-key-3\r\n"), 401);
    assert_eq!(publish("Authorization: Bearer file-key-1\r\n"), 202);
    assert_eq!(publish("Authorization: Bearer file-key-2\r\n"), 202);
    server.signal("-TERM");
    assert_eq!(server.exit("SIGTERM").0.code(), Some(0));
}

#[test]
fn open_access_is_warned_about_off_loopback_only() {
    const OPEN: &str = "NO AUTHENTICATION";
    const NO_TOKEN: &str = "websocket clients need no token";
    let dir = tempfile::tempdir().expect("temporary directory");
    let secret = write(&dir, "jwt-secret", "s\n");
    for (listen, extra, warning) in [
        ("0.0.0.0:0", &[][..], Some(OPEN)),
        ("0.0.0.0:0", &["--api-key", "k"][..], Some(NO_TOKEN)),
        ("0.0.0.0:0", &["--jwt-secret-file", &secret][..], None),
        ("127.0.0.1:0", &[][..], None),
    ] {
        let mut cmd = shardcast();
        cmd.args(["--listen", listen, "--drain-delay", "0s"])
            .args(extra);
        let mut server = spawn(cmd);
        let warned: Vec<&String> = server
            .head
            .iter()
            .filter(|l| l.contains(OPEN) || l.contains(NO_TOKEN))
            .collect();
        match warning {
            Some(w) => {
                assert!(
                    warned.len() == 1 && warned[0].contains(w) && warned[0].contains("WARN"),
                    "{listen} {extra:?}: {:#?}",
                    server.head
                );
            }
            None => assert!(warned.is_empty(), "{listen} {extra:?}: {warned:#?}"),
        }
        server.signal("-TERM");
        assert_eq!(server.exit("SIGTERM").0.code(), Some(0));
    }
}

#[test]
fn max_connections_above_the_open_file_limit_is_warned_about() {
    const WARNING: &str = "--max-connections is above what the open-file limit allows";
    for (max, warned) in [("100000", true), ("100", false)] {
        // `ulimit -n` sets both the soft and the hard limit: the binary cannot raise it.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ulimit -n 512 && exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_shardcast"))
            .args(["--listen", "127.0.0.1:0", "--drain-delay", "0s"])
            .args(["--max-connections", max])
            .env_remove("RUST_LOG");
        for (k, _) in std::env::vars() {
            if k.starts_with("SHARDCAST_") {
                cmd.env_remove(k);
            }
        }
        let mut server = spawn(cmd);
        let line = server.head.iter().find(|l| l.contains(WARNING)).cloned();
        match line {
            Some(line) => {
                assert!(warned, "--max-connections {max}: {line}");
                assert_eq!(field(&line, "nofile"), "512", "{line}");
                assert_eq!(field(&line, "fits"), "448", "{line}");
            }
            None => assert!(!warned, "no warning: {:#?}", server.head),
        }
        server.signal("-TERM");
        assert_eq!(server.exit("SIGTERM").0.code(), Some(0));
    }
}

#[test]
fn no_arguments_give_the_documented_defaults() {
    // The README's table, spelled out; shards: the number of cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get().min(256));
    let expected = format!(
        "listen = \"127.0.0.1:8080\"
shards = {cores}
ping-interval = \"20s\"
pong-timeout = \"10s\"
max-message-bytes = 65536
send-queue-bytes = \"1MiB\"
write-timeout = \"10s\"
max-connections = 100000
client-publish = true
drain-timeout = \"10s\"
drain-delay = \"5s\"
log-format = \"text\"
handshake-timeout = \"10s\"
jwt-jwks-refresh = \"5m\"
jwt-jwks-cooldown = \"30s\"
jwt-audience = []
jwt-issuer = []
api-key = []
allowed-origin = []
bus-prefix = \"shardcast\"
demo = \"auto\"
"
    );
    assert_eq!(config_output(&[], &[]), expected);
}

#[test]
fn the_example_config_holds_only_defaults_and_round_trips() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/shardcast.example.toml");
    let printed = config_output(&["--config", example], &[]);
    // Its header says every value in it is the default.
    assert_eq!(printed, config_output(&[], &[]));
    // What `config` prints is itself a valid configuration file.
    let dir = tempfile::tempdir().expect("temporary directory");
    let again = write(&dir, "printed.toml", &printed);
    assert_eq!(config_output(&["--config", &again], &[]), printed);
}

#[test]
fn json_logs_carry_the_effective_configuration_without_secrets() {
    let mut server = start_binary(&[
        "--log-format",
        "json",
        "--jwt-secret",
        "do-not-print-me",
        "--drain-delay",
        "0s",
    ]);
    server.signal("-TERM");
    let (status, rest) = server.exit("SIGTERM");
    assert_eq!(status.code(), Some(0));
    let lines: Vec<&String> = server.head.iter().chain(&rest).collect();
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
