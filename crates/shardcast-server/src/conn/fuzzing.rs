//! The fuzzing entry for a connection's reader: runs `conn.rs`'s production reader (the
//! upgrade's leftover replay, the read loop, event handling, the choice of close code, the
//! publish rate limit, the drain) over one end of a `UnixStream` pair, writes the fuzz bytes
//! to the other end as the client, and reports what the reader told its shard. Not part of
//! the API: `fuzz/fuzz_targets/server_read.rs` and the tests below call it. The upgrade itself
//! and the shard's writing are not run here.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use shardcast_core::internals::ShardMsg;
use shardcast_core::reader::FrameReader;
use shardcast_core::{ConnShared, Engine, Slot, Socket};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::{Reader, Watch};
use crate::auth::Auth;
use crate::handshake::Publish;
use crate::relay::Relay;
use crate::{Config, DisconnectReason, Topic};

/// What the connection may do with the data messages it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A `/ws/{topic}` connection allowed to publish: each message is published to its topic.
    Publish,
    /// A multi-topic `/ws?topic=...` connection: a data message gets close 1008.
    MultiTopic,
    /// A connection whose token grants no publish right: a data message gets close 1008.
    NoPublishRight,
}

impl Access {
    /// The close reason the reader is given for refusing data (as `handshake.rs` words it).
    pub fn refusal(self) -> Option<&'static str> {
        match self {
            Self::Publish => None,
            Self::MultiTopic => Some("publish needs a single-topic connection"),
            Self::NoPublishRight => Some("token grants no publish right for this topic"),
        }
    }
}

/// The connection's settings and how the client's bytes arrive.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--max-message-bytes`.
    pub max_message_bytes: usize,
    pub access: Access,
    /// `--client-publish-rate`; `None`: no limit. At least 1 (the config validates it).
    pub publish_rate: Option<u32>,
    /// How many of the first bytes arrived with the upgrade request: the reader gets them as
    /// hyper's leftover, before its first socket read.
    pub leftover: usize,
    /// Sizes of the client's writes after the leftover; the bytes past their sum go in one
    /// last write. After each write the client waits (a few yields, no timer) for the reader
    /// to take it, so the reads usually split the input where the writes do.
    pub writes: Vec<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024,
            access: Access::Publish,
            publish_rate: None,
            leftover: 0,
            writes: Vec::new(),
        }
    }
}

/// One message the reader sent its shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// A published frame (`ShardMsg::Publish`), as subscribers receive it.
    Publish(Bytes),
    /// A control frame for this client (`ShardMsg::Control`): a pong.
    Control(Bytes),
    /// `ShardMsg::Close`: the server's close, or the echo of the client's.
    Close {
        code: u16,
        reason: &'static str,
        why: DisconnectReason,
    },
    /// A message a reader never sends (`Reserve`, `Attach`, `Stats`, `Drain`, `Shutdown`).
    Unexpected(&'static str),
}

/// What the reader did with one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every message the reader sent its shard, in order, without the final `Gone`.
    pub sent: Vec<Sent>,
    /// Whether the reader ended by telling the shard it is gone.
    pub gone: bool,
    /// The most [`FrameReader::buffered`] after any feed.
    pub peak_buffered: usize,
    /// Feeds of the parser: the leftover, then each socket read that returned bytes.
    pub feeds: usize,
}

/// Splits a server frame (`frame.rs`'s encoding: unmasked, one frame) into its first byte
/// and its payload. `None` if the header is short or its length disagrees with the frame's.
pub fn split_frame(frame: &[u8]) -> Option<(u8, &[u8])> {
    let (&first, rest) = frame.split_first()?;
    let (&b1, rest) = rest.split_first()?;
    if b1 & 0x80 != 0 {
        return None; // server frames are never masked
    }
    let (len, rest) = match b1 {
        126 => {
            let (n, rest) = rest.split_first_chunk::<2>()?;
            (u64::from(u16::from_be_bytes(*n)), rest)
        }
        127 => {
            let (n, rest) = rest.split_first_chunk::<8>()?;
            (u64::from_be_bytes(*n), rest)
        }
        n => (u64::from(n), rest),
    };
    (len == rest.len() as u64).then_some((first, rest))
}

/// The server's control frame encoders, for the `frame_roundtrip` target.
pub mod control {
    use bytes::Bytes;

    /// `frame::pong`: answers a ping with its payload (at most 125 bytes).
    pub fn pong(payload: &[u8]) -> Bytes {
        crate::frame::pong(payload)
    }

    /// `frame::ping`: the heartbeat.
    pub fn ping() -> Bytes {
        crate::frame::ping()
    }

    /// `frame::close`: the code, then the reason cut to fit 125 bytes.
    pub fn close(code: u16, reason: &str) -> Bytes {
        crate::frame::close(code, reason)
    }
}

thread_local! {
    /// One single-threaded runtime per thread, reused: building one per input would cost
    /// more than the input.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        // Fails only when the OS refuses the runtime's epoll and event descriptors; the
        // fuzzing entry can do nothing but stop then.
        .expect("a current-thread tokio runtime");
}

/// Runs the production reader on `wire`, the bytes a client sends after the upgrade, until
/// the reader ends (the client's side is shut down after the last byte), and reports what it
/// did. Must not be called from inside a tokio runtime.
pub fn server_read(wire: &[u8], options: &Options) -> Outcome {
    RUNTIME.with(|rt| rt.block_on(run(wire, options)))
}

/// Counts what the parser was fed and how much it held.
#[derive(Debug, Clone, Default)]
struct Probe(Rc<ProbeState>);

#[derive(Debug, Default)]
struct ProbeState {
    bytes: Cell<usize>,
    feeds: Cell<usize>,
    peak: Cell<usize>,
}

impl Watch for Probe {
    fn fed(&mut self, parser: &FrameReader, bytes: usize) {
        let s = &self.0;
        s.bytes.set(s.bytes.get() + bytes);
        s.feeds.set(s.feeds.get() + 1);
        s.peak.set(s.peak.get().max(parser.buffered()));
    }
}

/// A relay whose shards are not started: what the reader sends shard `i` waits in the
/// `i`-th receiver.
pub(crate) fn detached_relay(config: Config) -> (Relay, Vec<mpsc::Receiver<ShardMsg>>) {
    // The default (open) auth config always parses.
    let auth = Auth::new(&config.auth).expect("the default auth is valid");
    let (engine, inboxes) = Engine::without_shards(config.engine());
    (Relay::new(config, auth, engine, None, false), inboxes)
}

async fn run(wire: &[u8], options: &Options) -> Outcome {
    let config = Config {
        shards: 1,
        max_message_bytes: options.max_message_bytes,
        client_publish_rate: options.publish_rate,
        ..Config::default()
    };
    let (relay, mut inboxes) = detached_relay(config);
    // One shard (`config.shards`): its inbox is the one this function reads.
    let inbox = inboxes.remove(0);
    // "fuzz" is a valid topic name.
    let topic = Topic::new("fuzz").expect("a valid topic");
    // Shard 0 has a subscriber, so every publish reaches the inbox this function reads.
    relay.engine().mark_interest(&topic, 0);
    let publish = match options.access.refusal() {
        None => Publish::To(topic),
        Some(reason) => Publish::Refuse(reason),
    };

    // Fails only when the process is out of file descriptors.
    let (server, client) = UnixStream::pair().expect("a unix stream pair");
    let stream = Arc::new(Socket::Local(server));
    let conn = Arc::new(ConnShared::default());
    let probe = Probe::default();
    let peer = SocketAddr::from(([192, 0, 2, 1], 40000));
    let slot = Slot::new(0, 0, 1);
    let mut reader = Reader::new(relay, slot, Arc::clone(&conn), publish, peer, probe.clone());
    let (leftover, rest) = wire.split_at(options.leftover.min(wire.len()));
    // As `serve` does after the upgrade.
    let first = reader.replay(Bytes::copy_from_slice(leftover));
    let reading = reader.serve(Arc::clone(&stream), first);
    let writing = async {
        write(client, rest, &options.writes, &probe).await;
        // Keep the client's end open (its write side is shut) until the reader is done.
        std::future::pending::<()>().await;
    };
    let connection = async {
        // The writer is dropped once the reader has ended, so nothing writes to a socket
        // whose other end is gone.
        tokio::select! {
            biased;
            () = reading => {}
            () = writing => {}
        }
    };
    let ((), (sent, gone)) = tokio::join!(connection, shard(inbox, &conn));
    let s = &probe.0;
    Outcome {
        sent,
        gone,
        peak_buffered: s.peak.get(),
        feeds: s.feeds.get(),
    }
}

/// The client: writes `wire` in pieces of `writes` bytes, then shuts its write side down.
async fn write(mut client: UnixStream, wire: &[u8], writes: &[usize], probe: &Probe) {
    let mut rest = wire;
    let taken = probe.0.bytes.get(); // the leftover
    let mut written = 0;
    for size in writes.iter().copied().chain([usize::MAX]) {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(size.clamp(1, rest.len()));
        if client.write_all(piece).await.is_err() {
            break;
        }
        rest = tail;
        written += piece.len();
        // Bounded: once the reader has closed it drains without feeding the parser.
        for _ in 0..4 {
            if probe.0.bytes.get() >= taken + written {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    let _ = client.shutdown().await;
}

/// The shard's side: records what the reader sends until it says it is gone.
async fn shard(mut inbox: mpsc::Receiver<ShardMsg>, conn: &ConnShared) -> (Vec<Sent>, bool) {
    let mut sent = Vec::new();
    while let Some(msg) = inbox.recv().await {
        sent.push(match msg {
            ShardMsg::Publish { frame, .. } => Sent::Publish(frame),
            ShardMsg::Control { frame, .. } => Sent::Control(frame),
            ShardMsg::Close {
                code, reason, why, ..
            } => {
                // As the shard does when it begins a close: the reader publishes no more.
                conn.begin_closing();
                Sent::Close { code, reason, why }
            }
            ShardMsg::Gone { .. } => return (sent, true),
            ShardMsg::Reserve { .. } => Sent::Unexpected("reserve"),
            ShardMsg::Attach { .. } => Sent::Unexpected("attach"),
            ShardMsg::Stats(_) => Sent::Unexpected("stats"),
            ShardMsg::Drain { .. } => Sent::Unexpected("drain"),
            ShardMsg::Shutdown => Sent::Unexpected("shutdown"),
        });
    }
    (sent, false)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Opcode;
    use crate::frame::{self, client_frame, close_code};

    /// Collects a test's log lines.
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .expect("no writer panicked")
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs the entry on a thread of its own, with its debug logs captured, and fails loudly
    /// if it does not end.
    fn read_logged(wire: Vec<u8>, options: Options) -> (Outcome, String) {
        let max = options.max_message_bytes;
        let logs = Logs::default();
        let writer = logs.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            let outcome =
                tracing::subscriber::with_default(subscriber, || server_read(&wire, &options));
            let _ = tx.send(outcome);
        });
        let outcome = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server_read ends within 10 s without panicking");
        assert!(outcome.gone, "the reader told the shard it is gone");
        assert!(
            outcome.peak_buffered <= max + 125,
            "{} bytes buffered with a limit of {max}",
            outcome.peak_buffered
        );
        let text = String::from_utf8_lossy(&logs.0.lock().expect("no writer panicked")).into();
        (outcome, text)
    }

    fn read(wire: Vec<u8>, options: Options) -> Outcome {
        read_logged(wire, options).0
    }

    fn closed(code: u16, reason: &'static str, why: DisconnectReason) -> Sent {
        Sent::Close { code, reason, why }
    }

    #[test]
    fn a_masked_text_frame_is_published() {
        let out = read(client_frame(true, 0x1, b"hello"), Options::default());
        assert_eq!(
            out.sent,
            vec![Sent::Publish(frame::encode(Opcode::Text, b"hello"))]
        );
        assert_eq!(
            split_frame(&frame::encode(Opcode::Text, b"hello")),
            Some((0x81, &b"hello"[..]))
        );
    }

    #[test]
    fn a_frame_split_over_the_leftover_and_many_reads_is_published() {
        let payload = vec![7u8; 300];
        let options = Options {
            leftover: 3,
            writes: vec![1, 2, 50, 1],
            ..Options::default()
        };
        let out = read(client_frame(true, 0x2, &payload), options);
        assert_eq!(
            out.sent,
            vec![Sent::Publish(frame::encode(Opcode::Binary, &payload))]
        );
        assert!(out.feeds >= 2, "the leftover and at least one read");
    }

    #[test]
    fn an_unmasked_frame_gets_1002() {
        let out = read(b"\x81\x05hello".to_vec(), Options::default());
        assert_eq!(
            out.sent,
            vec![closed(
                close_code::PROTOCOL_ERROR,
                "client frame not masked",
                DisconnectReason::ProtocolError
            )]
        );
    }

    #[test]
    fn a_message_over_the_limit_gets_1009_and_is_never_buffered() {
        let options = Options {
            max_message_bytes: 16,
            writes: vec![8, 8, 8],
            ..Options::default()
        };
        let mut wire = client_frame(false, 0x2, &[1; 10]);
        wire.extend(client_frame(true, 0x0, &[2; 7]));
        let out = read(wire, options);
        assert_eq!(
            out.sent,
            vec![closed(
                close_code::TOO_BIG,
                "message too big",
                DisconnectReason::ProtocolError
            )]
        );
        assert!(out.peak_buffered <= 16 + 125, "{}", out.peak_buffered);
    }

    #[test]
    fn data_without_a_publish_right_gets_1008() {
        for access in [Access::MultiTopic, Access::NoPublishRight] {
            let options = Options {
                access,
                ..Options::default()
            };
            let mut wire = client_frame(true, 0x9, b"p");
            wire.extend(client_frame(true, 0x1, b"hi"));
            wire.extend(client_frame(true, 0x1, b"after the close"));
            let out = read(wire, options);
            let reason = access.refusal().expect("a refusing access");
            assert_eq!(
                out.sent,
                vec![
                    Sent::Control(frame::pong(b"p")),
                    closed(close_code::POLICY, reason, DisconnectReason::ProtocolError)
                ],
                "{access:?}"
            );
        }
    }

    #[test]
    fn publishing_past_the_rate_gets_1008() {
        // One message a second: the second, sent at once, is over the rate.
        let options = Options {
            publish_rate: Some(1),
            ..Options::default()
        };
        let mut wire = client_frame(true, 0x1, b"one");
        wire.extend(client_frame(true, 0x1, b"two"));
        let out = read(wire, options);
        assert_eq!(
            out.sent,
            vec![
                Sent::Publish(frame::encode(Opcode::Text, b"one")),
                closed(
                    close_code::POLICY,
                    "publish rate exceeded",
                    DisconnectReason::RateLimited
                )
            ]
        );
    }

    #[test]
    fn the_clients_close_is_echoed_and_later_frames_ignored() {
        let mut wire = client_frame(true, 0x9, b"ping");
        wire.extend(client_frame(true, 0x8, &[0x03, 0xE9, b'b', b'y', b'e']));
        wire.extend(client_frame(true, 0x1, b"ignored"));
        wire.extend(b"\x81\x05unmasked garbage after the close");
        let out = read(wire, Options::default());
        assert_eq!(
            out.sent,
            vec![
                Sent::Control(frame::pong(b"ping")),
                closed(1001, "", DisconnectReason::ClientClose)
            ]
        );
    }

    #[test]
    fn split_frame_refuses_a_length_that_disagrees() {
        assert_eq!(split_frame(b"\x81\x03ab"), None);
        assert_eq!(split_frame(b"\x81"), None);
        assert_eq!(split_frame(b"\x81\x82abcd"), None, "masked");
        let long = frame::encode(Opcode::Binary, &[0; 70000]);
        assert_eq!(
            split_frame(&long).map(|(b, p)| (b, p.len())),
            Some((0x82, 70000))
        );
    }

    #[test]
    fn every_rejection_is_logged_with_the_peer_address() {
        let two = [client_frame(true, 0x1, b"1"), client_frame(true, 0x1, b"2")].concat();
        let cases = [
            (b"\x81\x00".to_vec(), Options::default(), "protocol error"),
            (
                two.clone(),
                Options {
                    access: Access::MultiTopic,
                    ..Options::default()
                },
                "data message refused",
            ),
            (
                two,
                Options {
                    publish_rate: Some(1),
                    ..Options::default()
                },
                "publish rate exceeded",
            ),
        ];
        for (wire, options, what) in cases {
            let (out, logs) = read_logged(wire, options);
            assert!(
                matches!(
                    out.sent.last(),
                    Some(Sent::Close {
                        code: 1002 | 1008,
                        ..
                    })
                ),
                "{what}: {:?}",
                out.sent
            );
            let line = logs
                .lines()
                .find(|l| l.contains(what))
                .unwrap_or_else(|| panic!("no {what:?} line in {logs:?}"));
            assert!(line.contains("DEBUG"), "{line}");
            assert!(line.contains("peer=192.0.2.1:40000"), "{line}");
        }
    }
}
