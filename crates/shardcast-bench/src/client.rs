//! The lean WebSocket client the load generator and the tools use: dialing from a chosen
//! loopback source address, the opening handshake over a plain `TcpStream`, masked client
//! frames, and a parser for (unmasked) server frames that borrows from one reusable buffer.
//! Scenario logic lives in `scenario/`, HTTP publishing in `post.rs`.
//!
//! A peer server may send anything: every malformed input is an [`Error::Protocol`], never a
//! panic, and every buffer is bounded.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::Error;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest response head accepted in a handshake.
const MAX_HEAD: usize = 16 * 1024;
/// Largest server frame accepted by default (a bench payload is far smaller).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// A small, fast, seeded generator (SplitMix64) for masks, keys and filler. Not for secrets:
/// a load generator's masks only need to vary, and runs must repeat under `--seed`.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_ne_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Where connections come from: with a per-address count, connection `i` binds
/// 127.0.0.(2 + i / per_addr) with `IP_BIND_ADDRESS_NO_PORT`, so the kernel picks the port at
/// connect time and each address gives a fresh range of 4-tuples. Only for IPv4 loopback
/// destinations; anything else lets the kernel choose the source.
#[derive(Debug, Clone, Copy)]
pub struct Dialer {
    pub dest: SocketAddr,
    pub per_addr: u32,
}

impl Dialer {
    pub fn source(&self, index: u64) -> Option<Ipv4Addr> {
        match self.dest.ip() {
            IpAddr::V4(ip) if ip.is_loopback() && self.per_addr > 0 => {
                // 127.0.0.2 to 127.0.255.254: 65,000 addresses, then wrap around.
                let n = (index / u64::from(self.per_addr)) % 65_000;
                let host = 2 + n as u32;
                Some(Ipv4Addr::from(0x7F00_0000 | host))
            }
            _ => None,
        }
    }

    /// Opens a TCP connection for connection number `index`.
    pub async fn connect(&self, index: u64) -> io::Result<TcpStream> {
        self.connect_tuned(index, None).await
    }

    /// Opens a TCP connection for connection number `index`; with `small_rcvbuf`, its receive
    /// buffer is that small and its segments are 536 bytes, both set before the SYN. A reader
    /// that stops reading then fills the kernel's buffers of both ends in tens of KiB (the
    /// server's send buffer is sized from the segment size), instead of megabytes on loopback:
    /// the soak's slow readers.
    pub async fn connect_tuned(
        &self,
        index: u64,
        small_rcvbuf: Option<usize>,
    ) -> io::Result<TcpStream> {
        let domain = socket2::Domain::for_address(self.dest);
        let sock =
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        sock.set_nonblocking(true)?;
        if let Some(bytes) = small_rcvbuf {
            sock.set_recv_buffer_size(bytes)?;
            nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::TcpMaxSeg, &536)
                .map_err(io::Error::from)?;
        }
        if let Some(src) = self.source(index) {
            nix::sys::socket::setsockopt(
                &sock,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )
            .map_err(io::Error::from)?;
            sock.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())?;
        }
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
        let stream = socket.connect(self.dest).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// What a handshake sends besides the fixed lines.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub host: &'a str,
    pub target: &'a str,
    pub headers: &'a [(String, String)],
}

/// The `Sec-WebSocket-Accept` value the server must answer to `key`.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Performs the opening handshake on `stream`. Bytes after the response head (early frames)
/// stay in `reader`.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reader: &mut FrameReader,
    req: &Request<'_>,
    rng: &mut Rng,
) -> Result<(), Error> {
    let mut key_bytes = [0u8; 16];
    rng.fill(&mut key_bytes);
    let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
    let mut head = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        req.target, req.host
    );
    for (name, value) in req.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| Error::io("sending the handshake", e))?;
    let head_len = reader.read_head(stream).await?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut res = httparse::Response::new(&mut headers);
    let parsed = res
        .parse(&reader.buf[..head_len])
        .map_err(|e| Error::Protocol(format!("bad handshake response: {e}")))?;
    if !parsed.is_complete() {
        return Err(Error::Protocol("incomplete handshake response".into()));
    }
    let status = res.code.unwrap_or(0);
    if status != 101 {
        let body = String::from_utf8_lossy(&reader.buf[head_len..reader.end]);
        let body: String = body.chars().take(200).collect();
        return Err(Error::Refused {
            status,
            body: body.trim().to_string(),
        });
    }
    let accept = res
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value);
    if accept != Some(accept_key(&key).as_bytes()) {
        return Err(Error::Protocol(
            "wrong or missing Sec-WebSocket-Accept".into(),
        ));
    }
    reader.start = head_len;
    Ok(())
}

/// Dials connection `index` and performs the handshake within `timeout`.
pub async fn open(
    dialer: &Dialer,
    index: u64,
    req: &Request<'_>,
    reader: &mut FrameReader,
    rng: &mut Rng,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    let fut = async {
        let mut stream = dialer
            .connect(index)
            .await
            .map_err(|e| Error::io(format!("connecting to {}", dialer.dest), e))?;
        handshake(&mut stream, reader, req, rng).await?;
        Ok(stream)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout(format!("handshake with {}", dialer.dest))),
    }
}

/// One server frame, borrowed from the reader's buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// Buffers bytes from a socket and cuts them into server frames. One buffer per connection,
/// grown only to fit a frame larger than it, up to `max_frame`.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes from `start` the next frame needs, once it is known to be incomplete.
    need: usize,
    max_frame: usize,
}

impl FrameReader {
    pub fn new(capacity: usize, max_frame: usize) -> FrameReader {
        FrameReader {
            buf: vec![0; capacity.max(256)],
            start: 0,
            end: 0,
            need: 0,
            max_frame,
        }
    }

    /// Reads more bytes. `Ok(0)` is end of file.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let want = self.need.max(self.end - self.start + 1);
        if self.end == self.buf.len() || self.start + want > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
        }
        let n = r.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Reads until a complete HTTP response head is buffered; returns its length.
    async fn read_head<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<usize, Error> {
        loop {
            if let Some(i) = find(&self.buf[self.start..self.end], b"\r\n\r\n") {
                return Ok(self.start + i + 4);
            }
            if self.end - self.start >= MAX_HEAD {
                return Err(Error::Protocol(
                    "handshake response head over 16 KiB".into(),
                ));
            }
            let n = self
                .fill(r)
                .await
                .map_err(|e| Error::io("reading the handshake response", e))?;
            if n == 0 {
                return Err(Error::Protocol(
                    "connection closed during the handshake".into(),
                ));
            }
        }
    }

    /// The next complete frame, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, Error> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            self.need = 2;
            return Ok(None);
        }
        let (b0, b1) = (b[0], b[1]);
        if b0 & 0x70 != 0 {
            return Err(Error::Protocol("reserved bit set in a server frame".into()));
        }
        if b1 & 0x80 != 0 {
            return Err(Error::Protocol("masked server frame".into()));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        let (header, len) = match b1 & 0x7F {
            126 => {
                if b.len() < 4 {
                    self.need = 4;
                    return Ok(None);
                }
                (4, u64::from(u16::from_be_bytes([b[2], b[3]])))
            }
            127 => {
                if b.len() < 10 {
                    self.need = 10;
                    return Ok(None);
                }
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (10, u64::from_be_bytes(l))
            }
            n => (2, u64::from(n)),
        };
        match opcode {
            OP_CONT | OP_TEXT | OP_BINARY => {}
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin || len > 125 {
                    return Err(Error::Protocol(
                        "fragmented or oversized control frame".into(),
                    ));
                }
            }
            other => return Err(Error::Protocol(format!("unknown opcode {other:#x}"))),
        }
        if len > self.max_frame as u64 {
            return Err(Error::Protocol(format!(
                "frame of {len} bytes over the limit of {}",
                self.max_frame
            )));
        }
        let total = header + len as usize; // len <= max_frame, a usize
        if b.len() < total {
            self.need = total;
            return Ok(None);
        }
        let at = self.start;
        self.start += total;
        self.need = 0;
        Ok(Some(Frame {
            fin,
            opcode,
            payload: &self.buf[at + header..at + total],
        }))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Appends a final, masked client frame.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    shardcast_core::frame::encode_client(out, true, opcode, payload, mask);
}

/// Appends a masked close frame with `code` (none: an empty close).
pub fn encode_close(out: &mut Vec<u8>, code: Option<u16>, mask: [u8; 4]) {
    match code {
        Some(c) => encode_frame(out, OP_CLOSE, &c.to_be_bytes(), mask),
        None => encode_frame(out, OP_CLOSE, &[], mask),
    }
}

/// The code and reason of a close frame's payload.
pub fn close_info(payload: &[u8]) -> (Option<u16>, String) {
    if payload.len() < 2 {
        return (None, String::new());
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let reason: String = String::from_utf8_lossy(&payload[2..])
        .chars()
        .take(60)
        .collect();
    (Some(code), reason)
}

/// A short label for how a connection ended, for the disconnect summary.
pub fn close_label(code: Option<u16>, reason: &str) -> String {
    match (code, reason.is_empty()) {
        (Some(c), true) => format!("close {c}"),
        (Some(c), false) => format!("close {c} ({reason})"),
        (None, _) => "close (no code)".to_string(),
    }
}

/// A short label for an I/O error that ended a connection.
pub fn io_label(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionReset => "reset".to_string(),
        io::ErrorKind::BrokenPipe => "broken pipe".to_string(),
        k => format!("io: {k}"),
    }
}

/// What a connection does with a control frame: answer pings and closes, as RFC 6455 asks.
/// Returns `Some(label)` when the frame was a close (the connection is over).
pub async fn answer_control<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame<'_>,
    rng: &mut Rng,
    scratch: &mut Vec<u8>,
) -> Result<Option<String>, io::Error> {
    match frame.opcode {
        OP_PING => {
            scratch.clear();
            encode_frame(scratch, OP_PONG, frame.payload, rng.mask());
            w.write_all(scratch).await?;
            Ok(None)
        }
        OP_CLOSE => {
            let (code, reason) = close_info(frame.payload);
            scratch.clear();
            encode_close(scratch, code, rng.mask());
            // The server may already be gone; the echo is a courtesy.
            let _ = w.write_all(scratch).await;
            Ok(Some(close_label(code, &reason)))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=65535 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn frames_split_anywhere_parse_the_same() {
        let big = vec![7u8; 70_000];
        let mut wire = server_frame(0x82, b"hello");
        wire.extend(server_frame(0x89, b"p"));
        wire.extend(server_frame(0x81, &big[..300]));
        wire.extend(server_frame(0x82, &big));
        for chunk in [1, 3, 100, 4096, wire.len()] {
            let mut r = FrameReader::new(256, DEFAULT_MAX_FRAME);
            let mut src: &[u8] = &wire;
            let mut got = Vec::new();
            while !src.is_empty() {
                let take = chunk.min(src.len());
                let mut part = &src[..take];
                src = &src[take..];
                while !part.is_empty() {
                    let n = r.fill(&mut part).await.unwrap();
                    assert!(n > 0);
                }
                while let Some(f) = r.next_frame().unwrap() {
                    got.push((f.opcode, f.payload.len()));
                }
            }
            assert_eq!(
                got,
                vec![(2, 5), (9, 1), (1, 300), (2, 70_000)],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn bad_server_frames_are_errors_not_panics() {
        for bad in [
            vec![0x82 | 0x40, 0],                       // RSV1
            vec![0x82, 0x80, 0, 0, 0, 0],               // masked
            vec![0x83, 0],                              // unknown opcode
            vec![0x09, 0],                              // fragmented ping
            server_frame(0x89, &[0u8; 126]),            // control over 125
            vec![0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0], // huge length
        ] {
            let mut r = FrameReader::new(256, 1024);
            r.buf[..bad.len()].copy_from_slice(&bad);
            r.end = bad.len();
            assert!(r.next_frame().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn client_frames_are_masked() {
        let mut out = Vec::new();
        encode_frame(&mut out, OP_TEXT, b"abcde", [1, 2, 3, 4]);
        assert_eq!(&out[..6], &[0x81, 0x85, 1, 2, 3, 4]);
        let unmasked: Vec<u8> = out[6..]
            .iter()
            .zip([1u8, 2, 3, 4].iter().cycle())
            .map(|(b, m)| b ^ m)
            .collect();
        assert_eq!(unmasked, b"abcde");
    }

    #[test]
    fn accept_key_matches_rfc_6455() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn sources_spread_over_loopback_addresses() {
        let d = Dialer {
            dest: "127.0.0.1:80".parse().unwrap(),
            per_addr: 2,
        };
        assert_eq!(d.source(0), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(d.source(3), Some(Ipv4Addr::new(127, 0, 0, 3)));
        assert_eq!(d.source(2 * 300), Some(Ipv4Addr::new(127, 0, 1, 46)));
        let remote = Dialer {
            dest: "[::1]:80".parse().unwrap(),
            per_addr: 2,
        };
        assert_eq!(remote.source(0), None);
    }
}
