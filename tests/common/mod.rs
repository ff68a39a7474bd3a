//! Shared test harness: a relay on `127.0.0.1:0` and small WebSocket client helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use shardcast::{Config, Relay, Server};
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write request");
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

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
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

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// A WebSocket opened over a plain `TcpStream`, for sending frames a real client library would
/// refuse to send and for not reading at all.
pub async fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    raw_ws_on(TcpStream::connect(addr).await.expect("connect"), path).await
}

pub async fn raw_ws_on(mut s: TcpStream, path: &str) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write handshake");
    // Read the response head byte by byte so no frame byte is consumed by accident.
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
    s
}

/// A masked client frame.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut f = vec![(u8::from(fin) << 7) | opcode];
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n @ 126..=65535 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
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

/// Writes raw bytes, ignoring a reset: the server may close before it has read everything.
pub async fn raw_send(s: &mut TcpStream, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let _ = s.write_all(bytes).await;
}

/// After a bad client is closed, the server still serves: a fresh pair exchanges a message.
pub async fn assert_still_serving(s: &TestServer) {
    let mut a = s.connect("/ws/still-serving").await;
    let mut b = s.connect("/ws/still-serving").await;
    send_text(&mut a, "alive").await;
    assert_eq!(
        next_data(&mut b).await.into_text().unwrap().as_str(),
        "alive"
    );
}
