//! A keep-alive HTTP/1.1 client for publishing with `POST`: one request at a time on one
//! connection, reconnecting when the server closes it. Reads `Content-Length` and chunked
//! bodies (and discards them); bodies over 1 MiB are an error. WebSocket lives in `client.rs`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Error;
use super::client::Dialer;
use super::url::Url;

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1 << 20;

/// Posts bodies to one URL over a kept-alive connection.
#[derive(Debug)]
pub struct Poster {
    dialer: Dialer,
    index: u64,
    url: Url,
    host: String,
    head_tail: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    have: usize,
    req: Vec<u8>,
}

/// A response's status and body (the body is kept only when asked for).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Poster {
    /// `index` picks the source address, as for WebSocket connections.
    pub fn new(
        dialer: Dialer,
        index: u64,
        url: Url,
        content_type: &str,
        headers: &[(String, String)],
    ) -> Poster {
        let mut head_tail = format!("Content-Type: {content_type}\r\n");
        for (n, v) in headers {
            head_tail.push_str(&format!("{n}: {v}\r\n"));
        }
        Poster {
            dialer,
            index,
            host: url.host_header(),
            url,
            head_tail,
            stream: None,
            buf: vec![0; 4096],
            have: 0,
            req: Vec::with_capacity(512),
        }
    }

    /// Sends one `POST` and waits for its response. `keep_body` keeps the response body.
    pub async fn post(&mut self, body: &[u8], keep_body: bool) -> Result<Response, Error> {
        // A kept-alive connection the server closed meanwhile fails on first use: retry once
        // on a fresh one (a POST the server never read is safe to resend).
        let fresh = self.stream.is_none();
        match self.try_post(body, keep_body).await {
            Err(Error::Io { .. }) if !fresh => {
                self.stream = None;
                self.try_post(body, keep_body).await
            }
            r => r,
        }
    }

    async fn try_post(&mut self, body: &[u8], keep_body: bool) -> Result<Response, Error> {
        if self.stream.is_none() {
            let s = self
                .dialer
                .connect(self.index)
                .await
                .map_err(|e| Error::io(format!("connecting to {}", self.dialer.dest), e))?;
            self.stream = Some(s);
            self.have = 0;
        }
        self.req.clear();
        self.req.extend_from_slice(b"POST ");
        self.req.extend_from_slice(self.url.target.as_bytes());
        self.req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        self.req.extend_from_slice(self.host.as_bytes());
        self.req.extend_from_slice(b"\r\nContent-Length: ");
        self.req
            .extend_from_slice(body.len().to_string().as_bytes());
        self.req.extend_from_slice(b"\r\n");
        self.req.extend_from_slice(self.head_tail.as_bytes());
        self.req.extend_from_slice(b"\r\n");
        self.req.extend_from_slice(body);
        let result = self.exchange(keep_body).await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange(&mut self, keep_body: bool) -> Result<Response, Error> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Error::Protocol("no connection".into()));
        };
        stream
            .write_all(&self.req)
            .await
            .map_err(|e| Error::io("sending a POST", e))?;
        // The head.
        let head_len = loop {
            if let Some(i) = self.buf[..self.have]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                break i + 4;
            }
            if self.have >= MAX_HEAD {
                return Err(Error::Protocol("response head over 16 KiB".into()));
            }
            read_more(stream, &mut self.buf, &mut self.have).await?;
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut headers);
        res.parse(&self.buf[..head_len])
            .map_err(|e| Error::Protocol(format!("bad response: {e}")))?;
        let status = res.code.unwrap_or(0);
        let header = |name: &str| {
            res.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
        };
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length = header("content-length")
            .map(|v| v.trim().parse::<usize>())
            .transpose()
            .map_err(|_| Error::Protocol("bad Content-Length".into()))?;
        let close =
            header("connection").is_some_and(|v| v.contains("close")) || res.version == Some(0);
        self.consume(head_len);
        let mut body = Vec::new();
        if chunked {
            self.read_chunked(keep_body, &mut body).await?;
        } else if let Some(len) = length {
            if len > MAX_BODY {
                return Err(Error::Protocol("response body over 1 MiB".into()));
            }
            self.read_exact_body(len, keep_body, &mut body).await?;
        } else if status >= 200 && status != 204 && status != 304 {
            // No length: the body runs to the end of the connection.
            self.read_to_end(keep_body, &mut body).await?;
            self.stream = None;
        }
        if close {
            self.stream = None;
        }
        Ok(Response { status, body })
    }

    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.have, 0);
        self.have -= n;
    }

    async fn read_exact_body(
        &mut self,
        mut len: usize,
        keep: bool,
        body: &mut Vec<u8>,
    ) -> Result<(), Error> {
        loop {
            let take = len.min(self.have);
            if keep {
                body.extend_from_slice(&self.buf[..take]);
            }
            self.consume(take);
            len -= take;
            if len == 0 {
                return Ok(());
            }
            let Some(stream) = self.stream.as_mut() else {
                return Err(Error::Protocol("no connection".into()));
            };
            read_more(stream, &mut self.buf, &mut self.have).await?;
        }
    }

    async fn read_line(&mut self) -> Result<String, Error> {
        loop {
            if let Some(i) = self.buf[..self.have].windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).to_string();
                self.consume(i + 2);
                return Ok(line);
            }
            if self.have >= MAX_HEAD {
                return Err(Error::Protocol("chunk line over 16 KiB".into()));
            }
            let Some(stream) = self.stream.as_mut() else {
                return Err(Error::Protocol("no connection".into()));
            };
            read_more(stream, &mut self.buf, &mut self.have).await?;
        }
    }

    async fn read_chunked(&mut self, keep: bool, body: &mut Vec<u8>) -> Result<(), Error> {
        let mut total = 0usize;
        loop {
            let line = self.read_line().await?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| Error::Protocol(format!("bad chunk size {size:?}")))?;
            if size == 0 {
                // Trailers, if any, end with an empty line.
                for _ in 0..64 {
                    if self.read_line().await?.is_empty() {
                        return Ok(());
                    }
                }
                return Err(Error::Protocol("too many trailers".into()));
            }
            total = total.saturating_add(size);
            if total > MAX_BODY {
                return Err(Error::Protocol("response body over 1 MiB".into()));
            }
            self.read_exact_body(size, keep, body).await?;
            if !self.read_line().await?.is_empty() {
                return Err(Error::Protocol("chunk not followed by CRLF".into()));
            }
        }
    }

    async fn read_to_end(&mut self, keep: bool, body: &mut Vec<u8>) -> Result<(), Error> {
        loop {
            if keep {
                body.extend_from_slice(&self.buf[..self.have]);
            }
            if body.len() > MAX_BODY {
                return Err(Error::Protocol("response body over 1 MiB".into()));
            }
            self.have = 0;
            let Some(stream) = self.stream.as_mut() else {
                return Ok(());
            };
            match stream.read(&mut self.buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => self.have = n,
                Err(e) => return Err(Error::io("reading a response", e)),
            }
        }
    }
}

async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    have: &mut usize,
) -> Result<(), Error> {
    if *have == buf.len() {
        buf.resize(buf.len() * 2, 0);
    }
    match stream.read(&mut buf[*have..]).await {
        Ok(0) => Err(Error::io(
            "reading a response",
            std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
        )),
        Ok(n) => {
            *have += n;
            Ok(())
        }
        Err(e) => Err(Error::io("reading a response", e)),
    }
}
