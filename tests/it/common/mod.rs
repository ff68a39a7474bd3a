//! Shared test harness: a relay on `127.0.0.1:0` and small WebSocket client helpers.
#![allow(dead_code)]

pub mod brokers;
pub mod netns;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use shardcast::{Config, Relay, Server, Stats};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A running relay. Dropping it without `stop` leaves the server to die with the runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub relay: Relay,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), shardcast::Error>>,
}

/// Settings small enough for tests; heartbeats far away unless a test wants them.
pub fn config() -> Config {
    Config {
        shards: 2,
        ping_interval: Duration::from_secs(3600),
        pong_timeout: Duration::from_secs(3600),
        drain_timeout: Duration::from_secs(5),
        drain_delay: Duration::ZERO,
        ..Config::default()
    }
}

pub async fn start(config: Config) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let server = Server::new(listener, config).expect("valid config");
    let addr = server.local_addr().expect("local addr");
    let relay = server.relay();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    TestServer {
        addr,
        relay,
        stop: Some(stop),
        task,
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Opens a WebSocket; the subscription is in place once this returns.
    pub async fn connect(&self, path: &str) -> Ws {
        let (ws, res) = tokio_tungstenite::connect_async(self.url(path))
            .await
            .expect("websocket handshake");
        assert_eq!(res.status(), 101);
        ws
    }

    /// Starts shutdown and waits for the server's future to complete.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task
            .await
            .expect("server task")
            .expect("server result");
    }

    /// Sends a raw HTTP/1.1 request and returns (status, headers+body text).
    pub async fn http(&self, request: &str) -> (u16, String) {
        raw_http(self.addr, request.as_bytes()).await
    }

    pub async fn post(&self, path: &str, content_type: &str, body: &[u8]) -> u16 {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        raw_http(self.addr, &req).await.0
    }
}

pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write request");
    read_http_response(&mut s).await
}

/// Reads one HTTP response: until its head and `Content-Length` bytes of body are in, or the
/// server ends the connection. Returns (status, headers+body text).
pub async fn read_http_response(s: &mut (impl AsyncRead + Unpin)) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    // The server closes (Connection: close) or we read until the head is complete.
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("http status line");
    (status, text)
}

/// The value of header `name` in a response as `raw_http` returns it.
pub fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The longest a single step may take before a test fails instead of hanging: generous,
/// since the machine running the tests may be busy.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test (naming `what`) if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Awaits `fut`, failing the test (naming `what`) if it takes longer than `limit`. For
/// paused-clock tests whose event legitimately lies more than [`WAIT`] of virtual time away:
/// there the bound is virtual too, and a lost event fails at once in real time, since the
/// shards' tick timers keep the paused clock moving.
pub async fn within_for<T>(
    what: impl std::fmt::Display,
    limit: Duration,
    fut: impl Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// The relay's counters, bounded by [`WAIT`] (each shard answers through its inbox).
pub async fn stats_now(s: &TestServer) -> Stats {
    within("the relay's counters", s.relay.stats()).await
}

/// Runs `shardcast bench` with `args` (scenario first) off the test's runtime, bounded by
/// [`WAIT`]; fails the test if the arguments are bad or the run fails.
pub async fn bench_report<S: Into<String>>(
    args: impl IntoIterator<Item = S>,
) -> shardcast::loadgen::Report {
    let args: Vec<String> = args.into_iter().map(Into::into).collect();
    let args = shardcast::loadgen::BenchArgs::parse_from(args).expect("valid bench arguments");
    within(
        "the bench run",
        tokio::task::spawn_blocking(move || shardcast::loadgen::run_bench(&args)),
    )
    .await
    .expect("bench thread")
    .expect("bench run")
}

/// Reads until the server ends the connection, by end-of-file or a reset, and returns the
/// bytes that came first. Bounded by [`WAIT`].
pub async fn read_until_closed(s: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    within("the server to end the connection", async {
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
}

/// Next data message, skipping pings and pongs. Panics on close or end.
pub async fn next_data(ws: &mut Ws) -> Message {
    loop {
        match ws.next().await {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return m,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a data message, got {other:?}"),
        }
    }
}

/// Reads until the server's close frame and returns its code (None if the stream just ended).
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => return frame.map(|f: CloseFrame| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// Reads until the server's close frame and returns its (code, reason); `None` if the stream
/// ended without one. Unbounded like its siblings: wrap it in [`within`].
pub async fn close_frame(ws: &mut Ws) -> Option<(u16, String)> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => {
                return frame.map(|f: CloseFrame| (u16::from(f.code), f.reason.to_string()));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// A WebSocket opened over a plain `TcpStream`, for sending frames a real client library would
/// refuse to send and for not reading at all.
pub async fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    raw_ws_on(TcpStream::connect(addr).await.expect("connect"), path).await
}

pub async fn raw_ws_on(s: TcpStream, path: &str) -> TcpStream {
    raw_ws_with(s, path, "").await
}

/// The key and version lines of a valid upgrade request.
pub const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
pub const V13: &str = "Sec-WebSocket-Version: 13\r\n";

/// An upgrade request head: `headers` (each line ending in CRLF) follow the Upgrade and
/// Connection lines.
pub fn upgrade_request(method: &str, path: &str, headers: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{headers}\r\n"
    )
}

/// Like `raw_ws_on`, with `extra` header lines (each ending in CRLF) in the request.
pub async fn raw_ws_with(mut s: TcpStream, path: &str, extra: &str) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let req = upgrade_request("GET", path, &format!("{KEY}{V13}{extra}"));
    s.write_all(req.as_bytes()).await.expect("write handshake");
    read_101(&mut s).await;
    s
}

/// Reads a `101 Switching Protocols` response head byte by byte, so that no frame byte
/// behind it is consumed by accident; fails the test on any other response.
pub async fn read_101(s: &mut (impl AsyncRead + Unpin)) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.expect("read handshake response");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
}

/// Frame opcodes (RFC 6455 §5.2), as the load generator's client names them.
pub use shardcast_bench::client::{OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};

pub use shardcast::frame::client_frame;

/// A message of `opcode` sent as one fragment per part: the first carries the opcode, the
/// rest are continuations, the last is final.
pub fn fragmented(opcode: u8, parts: &[&[u8]]) -> Vec<u8> {
    let last = parts.len().saturating_sub(1);
    parts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| client_frame(i == last, if i == 0 { opcode } else { OP_CONT }, p))
        .collect()
}

/// A close frame's payload: the code, then the reason bytes.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// One server frame as read off a raw socket: (opcode, payload).
pub async fn read_server_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.ok()?;
    assert_eq!(h[1] & 0x80, 0, "server frames are never masked");
    let len = match h[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.ok()?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.ok()?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    Some((h[0] & 0x0F, payload))
}

/// Reads server frames until a close frame; returns its code. Panics if the socket ends first.
pub async fn raw_close_code(s: &mut TcpStream) -> u16 {
    loop {
        match read_server_frame(s).await {
            Some((0x8, p)) => return u16::from_be_bytes([p[0], p[1]]),
            Some(_) => continue,
            None => panic!("connection ended without a close frame"),
        }
    }
}

/// Reads server frames until a close frame; returns its (code, reason), or `None` if the
/// connection ended (end-of-file or reset) first. Unbounded: wrap it in [`within`].
pub async fn raw_close_frame(s: &mut TcpStream) -> Option<(u16, String)> {
    loop {
        match read_server_frame(s).await? {
            (0x8, p) => {
                assert!(p.len() >= 2, "a close frame without a code: {p:?}");
                let reason = String::from_utf8(p[2..].to_vec()).expect("close reason is UTF-8");
                return Some((u16::from_be_bytes([p[0], p[1]]), reason));
            }
            _ => continue,
        }
    }
}

/// The code of the server's close frame, after which the server must end the connection
/// and send nothing more. Bounded by [`WAIT`].
pub async fn raw_close_code_then_end(s: &mut TcpStream) -> u16 {
    let code = within("the server's close frame", raw_close_code(s)).await;
    let after = read_until_closed(s).await;
    assert!(after.is_empty(), "bytes after the close frame: {after:?}");
    code
}

/// Writes raw bytes, ignoring a reset: the server may close before it has read everything.
pub async fn raw_send(s: &mut TcpStream, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let _ = s.write_all(bytes).await;
}

/// After a bad client is closed, the server still serves: a fresh pair exchanges a message.
pub async fn assert_still_serving(s: &TestServer) {
    let mut a = within("a fresh client's handshake", s.connect("/ws/still-serving")).await;
    let mut b = within("a fresh client's handshake", s.connect("/ws/still-serving")).await;
    send_text(&mut a, "alive").await;
    let got = within("a message between fresh clients", next_data(&mut b)).await;
    assert_eq!(got, Message::text("alive"));
}

/// Polls the relay's counters until `done` holds, for effects that land after the client has
/// seen its last byte, such as a connection freed once its reader sees the client go.
/// At most [`WAIT`]; returns the counters that satisfied `done`, or fails naming `what` with
/// the last counters seen.
///
/// A bounded poll of a condition rather than a wait on a signal: the server has no change
/// notification, and adding one would put a wake-up on the shards' hot path for the tests'
/// sake. Each poll is one message per shard and the interval is 1 ms (virtual on a paused
/// clock), so the poll costs the server little and adds at most a millisecond to a test.
pub async fn stats_until(s: &TestServer, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
    let mut last = None;
    let poll = async {
        loop {
            let stats = s.relay.stats().await;
            if done(&stats) {
                return stats;
            }
            last = Some(stats);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let result = tokio::time::timeout(WAIT, poll).await;
    match result {
        Ok(stats) => stats,
        Err(_) => panic!("never saw {what} in {WAIT:?}; last counters seen: {last:?}"),
    }
}

/// Sends `head` to `tx` one byte per `step` (flushing each, for TLS) while reading `rx` until
/// the server closes, and checks the server cut the head off: not every byte went through and
/// nothing but a 408 came back. Answers when it closed (since `t0`) and how many bytes it took.
pub async fn head_cut_off(
    mut rx: impl AsyncRead + Unpin,
    mut tx: impl AsyncWrite + Unpin + Send + 'static,
    head: String,
    step: Duration,
    t0: tokio::time::Instant,
) -> (Duration, usize) {
    let head_len = head.len();
    let trickle = tokio::spawn(async move {
        let mut sent = 0;
        for b in head.bytes() {
            if tx.write_all(&[b]).await.is_err() || tx.flush().await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(step).await;
        }
        sent
    });
    let answer = read_until_closed(&mut rx).await;
    let closed_after = t0.elapsed();
    let sent = within("the trickle to stop", trickle)
        .await
        .expect("the trickling task does not panic");
    assert!(sent < head_len, "the whole head went through: {sent} bytes");
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"),
        "answered a head it never finished reading: {}",
        String::from_utf8_lossy(&answer)
    );
    (closed_after, sent)
}

/// The next data message on `ws` as text (bounded by [`within`]).
pub async fn next_text(ws: &mut Ws) -> String {
    within("the next message", next_data(ws))
        .await
        .into_text()
        .expect("a text message")
        .to_string()
}

/// A TCP connection to `addr` whose receive buffer is only 4 KiB, so that a client that does
/// not read soon stops the server's writes.
pub async fn small_buffer_connect(addr: SocketAddr, what: &str) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("a socket");
    sock.set_recv_buffer_size(4096)
        .expect("a small receive buffer");
    within(what, sock.connect(addr))
        .await
        .expect("connect to the test server")
}
