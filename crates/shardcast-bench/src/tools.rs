//! `shardcast sub` and `shardcast pub`: a curl-like pair for any WebSocket broadcast server.
//! `sub` prints each message on its own line (text as it is, binary as hex or base64); `pub`
//! sends one message, or each stdin line, as WebSocket frames or HTTP `POST`s. The load
//! generator itself lives in `worker.rs` and `scenario/`.

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use super::Error;
use super::args::{BinaryFormat, PubArgs, SubArgs};
use super::client::{self, Dialer, FrameReader, OP_BINARY, OP_CLOSE, OP_TEXT, Request, Rng};
use super::payload::now_ns;
use super::post::Poster;
use super::scenario::{ChannelWriter, read_loop};
use super::url::{Scheme, Url, parse_headers};

/// How long `pub` and `sub` wait for the server's answer to their close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// The largest message `sub` reassembles.
const MAX_MESSAGE: usize = 16 << 20;

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))
}

async fn dial(url: &Url) -> Result<Dialer, Error> {
    Ok(Dialer {
        dest: url.resolve().await?,
        per_addr: 0,
    })
}

fn ws_url(s: &str) -> Result<Url, Error> {
    let url = Url::parse(s)?;
    if url.scheme != Scheme::Ws {
        return Err(Error::BadArgs(format!("{s}: sub needs a ws:// URL")));
    }
    Ok(url)
}

/// Opens a WebSocket for a tool: the socket, its reader (frames up to `max_frame`), and a
/// generator for masks.
async fn open_ws(
    url: &Url,
    headers: &[(String, String)],
    max_frame: usize,
    timeout: Duration,
) -> Result<(tokio::net::TcpStream, FrameReader, Rng), Error> {
    let dialer = dial(url).await?;
    let mut reader = FrameReader::new(16 * 1024, max_frame);
    let mut rng = Rng::new(now_ns());
    let host = url.host_header();
    let req = Request {
        host: &host,
        target: &url.target,
        headers,
    };
    let stream = client::open(&dialer, 0, &req, &mut reader, &mut rng, timeout).await?;
    Ok((stream, reader, rng))
}

/// Formats one message as `sub` prints it.
pub fn format_message(opcode: u8, payload: &[u8], binary: BinaryFormat) -> String {
    if opcode == OP_TEXT {
        return String::from_utf8_lossy(payload).into_owned();
    }
    match binary {
        BinaryFormat::Hex => payload.iter().map(|b| format!("{b:02x}")).collect(),
        BinaryFormat::Base64 => base64::engine::general_purpose::STANDARD.encode(payload),
    }
}

/// Runs `shardcast sub` until `--count` messages, the server's close, or Ctrl-C. Returns the
/// number of messages printed.
pub fn run_sub(args: &SubArgs) -> Result<u64, Error> {
    let url = ws_url(&args.url)?;
    let headers = parse_headers(&args.headers)?;
    runtime()?.block_on(async {
        let (mut stream, mut reader, mut rng) =
            open_ws(&url, &headers, MAX_MESSAGE, args.connect_timeout).await?;
        let mut printed = 0u64;
        let mut message: Vec<u8> = Vec::new();
        let mut message_op = 0u8;
        let mut scratch = Vec::new();
        let mut out = std::io::stdout();
        let interrupt = tokio::signal::ctrl_c();
        tokio::pin!(interrupt);
        // Frames that arrived with the handshake response are already buffered: parse first.
        'read: loop {
            if args.count.is_some_and(|c| printed >= c) {
                break;
            }
            while let Some(frame) = reader.next_frame()? {
                match frame.opcode {
                    OP_TEXT | OP_BINARY | client::OP_CONT => {
                        if frame.opcode != client::OP_CONT {
                            message.clear();
                            message_op = frame.opcode;
                        }
                        if message.len() + frame.payload.len() > MAX_MESSAGE {
                            return Err(Error::Protocol("message over 16 MiB".into()));
                        }
                        message.extend_from_slice(frame.payload);
                        if frame.fin {
                            let line = format_message(message_op, &message, args.binary);
                            if writeln!(out, "{line}").is_err() {
                                // stdout closed (`| head`): stop quietly.
                                break 'read;
                            }
                            printed += 1;
                            if args.count.is_some_and(|c| printed >= c) {
                                break 'read;
                            }
                        }
                    }
                    OP_CLOSE => {
                        let (code, reason) = client::close_info(frame.payload);
                        let _ = client::answer_control(&mut stream, &frame, &mut rng, &mut scratch)
                            .await;
                        eprintln!("shardcast sub: {}", client::close_label(code, &reason));
                        return match code {
                            None | Some(1000) | Some(1001) => Ok(printed),
                            Some(c) => {
                                Err(Error::Protocol(format!("closed by the server with {c}")))
                            }
                        };
                    }
                    _ => {
                        client::answer_control(&mut stream, &frame, &mut rng, &mut scratch)
                            .await
                            .map_err(|e| Error::io("answering a ping", e))?;
                    }
                }
            }
            let n = tokio::select! {
                n = reader.fill(&mut stream) => n.map_err(|e| Error::io("reading", e))?,
                _ = &mut interrupt => break 'read,
            };
            if n == 0 {
                return Err(Error::Protocol(
                    "the server ended the connection without a close frame".into(),
                ));
            }
        }
        close_politely(&mut stream, &mut reader, &mut rng).await;
        Ok(printed)
    })
}

/// Sends close 1000 and waits briefly for the server's close or end of file.
async fn close_politely(
    stream: &mut tokio::net::TcpStream,
    reader: &mut FrameReader,
    rng: &mut Rng,
) {
    let mut out = Vec::new();
    client::encode_close(&mut out, Some(1000), rng.mask());
    if stream.write_all(&out).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = stream.split();
    let _ = tokio::time::timeout(
        CLOSE_WAIT,
        read_loop(&mut rd, &mut wr, reader, rng, |_, _| {}),
    )
    .await;
}

/// Runs `shardcast pub`: returns how many messages were published.
pub fn run_pub(args: &PubArgs) -> Result<u64, Error> {
    let url = Url::parse(&args.url)?;
    let headers = parse_headers(&args.headers)?;
    runtime()?.block_on(async {
        let (tx, mut messages) = mpsc::channel::<Vec<u8>>(64);
        match &args.message {
            Some(m) => {
                let _ = tx.send(m.clone().into_bytes()).await;
                drop(tx);
            }
            None => {
                tokio::spawn(async move {
                    let mut lines = BufReader::new(tokio::io::stdin()).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if tx.send(line.into_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
        match url.scheme {
            Scheme::Http => {
                let dialer = dial(&url).await?;
                let mut poster = Poster::new(dialer, 0, url, &args.content_type, &headers);
                let mut sent = 0;
                while let Some(body) = messages.recv().await {
                    let res = tokio::time::timeout(args.timeout, poster.post(&body, true))
                        .await
                        .map_err(|_| Error::Timeout("POST".into()))??;
                    if !(200..300).contains(&res.status) {
                        let body = String::from_utf8_lossy(&res.body);
                        return Err(Error::Refused {
                            status: res.status,
                            body: body.trim().chars().take(200).collect(),
                        });
                    }
                    sent += 1;
                }
                Ok(sent)
            }
            Scheme::Ws => {
                let (stream, reader, rng) =
                    open_ws(&url, &headers, client::DEFAULT_MAX_FRAME, args.timeout).await?;
                ws_publish(stream, reader, rng, &mut messages, args.binary).await
            }
        }
    })
}

/// Sends each message as a frame. What the server sends meanwhile (its broadcast of these
/// messages, pings) is read and discarded by a second task, so the server never sees a slow
/// consumer; pings are answered through the writer.
async fn ws_publish(
    stream: tokio::net::TcpStream,
    mut reader: FrameReader,
    mut rng: Rng,
    messages: &mut mpsc::Receiver<Vec<u8>>,
    binary: bool,
) -> Result<u64, Error> {
    let (mut rd, mut wr) = stream.into_split();
    let (control_tx, mut control) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut read_rng = rng.clone();
    let mut drain = tokio::spawn(async move {
        let mut w = ChannelWriter(control_tx);
        read_loop(&mut rd, &mut w, &mut reader, &mut read_rng, |_, _| {}).await
    });
    let opcode = if binary { OP_BINARY } else { OP_TEXT };
    let mut out = Vec::new();
    let mut sent = 0u64;
    loop {
        out.clear();
        tokio::select! {
            m = messages.recv() => match m {
                Some(m) => {
                    if !binary && std::str::from_utf8(&m).is_err() {
                        return Err(Error::BadArgs("a text message must be UTF-8 (use --binary)".into()));
                    }
                    client::encode_frame(&mut out, opcode, &m, rng.mask());
                    sent += 1;
                }
                None => break,
            },
            Some(bytes) = control.recv() => out.extend_from_slice(&bytes),
            label = &mut drain => {
                let label = label.unwrap_or_else(|_| "reader failed".into());
                return Err(Error::Protocol(format!("the server ended the connection: {label}")));
            }
        }
        wr.write_all(&out)
            .await
            .map_err(|e| Error::io("sending", e))?;
    }
    out.clear();
    client::encode_close(&mut out, Some(1000), rng.mask());
    wr.write_all(&out)
        .await
        .map_err(|e| Error::io("sending the close", e))?;
    let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_messages_print_as_hex_or_base64() {
        assert_eq!(
            format_message(OP_TEXT, b"hi there", BinaryFormat::Hex),
            "hi there"
        );
        assert_eq!(
            format_message(OP_BINARY, &[0, 0xab, 0x10], BinaryFormat::Hex),
            "00ab10"
        );
        assert_eq!(
            format_message(OP_BINARY, b"hi", BinaryFormat::Base64),
            "aGk="
        );
    }
}
