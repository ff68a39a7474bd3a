//! A WebSocket connection's reader: finishes the upgrade, then reads client frames and turns
//! them into publishes, pongs and closes. Writing to the client is the shard's job
//! (`shard.rs`); this task never writes to the socket.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::frame::{self, close_code};
use crate::reader::{Event, FrameReader, ProtocolError};
use crate::relay::{Relay, Slot};
use crate::shard::{ConnShared, ShardMsg};
use crate::{DisconnectReason, Topic};

/// What a connection may do with the data messages it sends.
#[derive(Debug, Clone)]
pub(crate) enum Publish {
    /// Publish to this topic (a `/ws/{topic}` connection).
    To(Topic),
    /// Refuse with close 1008 and this reason.
    Refuse(&'static str),
}

const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    /// Bytes read from a socket are parsed here and never kept, so a connection owns no read
    /// buffer while it waits.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// Waits until the socket is readable. Unlike `TcpStream::readable`, whose future carries a
/// 150-byte waiter, this keeps only the waker tokio already stores per socket: the reader is
/// the socket's only reader, so the single slot is enough.
fn readable(stream: &TcpStream) -> impl Future<Output = io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| stream.poll_read_ready(cx))
}

enum Read {
    Bytes(Result<(), ProtocolError>),
    Eof,
    NotReady,
    Failed(io::Error),
}

/// Completes the upgrade for the connection reserved at `slot`, then starts its reader.
///
/// The reader runs in a task of its own, spawned once the upgrade is done. That task lives as
/// long as the connection, and a future's size is the largest state of any `.await` in it;
/// keeping the upgrade and its arguments out of it, and boxing the short-lived large steps
/// (publishing, telling the shard), leaves little more than the parser: a few hundred bytes
/// per idle connection.
pub(crate) async fn serve(
    relay: Relay,
    slot: Slot,
    conn: Arc<ConnShared>,
    publish: Publish,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
) {
    let Some((stream, leftover)) = attach(&relay, slot, upgrade).await else {
        let Slot { shard, key, id } = slot;
        let _ = relay.to_shard(shard, ShardMsg::Gone { key, id }).await;
        return;
    };
    let parser = FrameReader::new(relay.config().max_message_bytes);
    let mut reader = Reader {
        relay,
        slot,
        conn,
        publish,
        parser,
        events: Vec::new(),
    };
    // `leftover` is a view into hyper's 8 KiB read buffer: parse it and let it go at once,
    // or every idle connection would keep that buffer alive.
    let first = reader.parser.feed(&leftover, &mut reader.events);
    drop(leftover);
    tokio::spawn(async move {
        reader.run(&stream, first).await;
        let Slot { shard, key, id } = reader.slot;
        let gone = reader.relay.to_shard(shard, ShardMsg::Gone { key, id });
        let _ = Box::pin(gone).await;
    });
}

/// Waits for the upgrade, then hands the socket's write side to the shard.
async fn attach(
    relay: &Relay,
    slot: Slot,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
) -> Option<(Arc<TcpStream>, Bytes)> {
    let Slot { shard, key, id } = slot;
    let parts = match upgrade.await {
        Ok(ws) => ws
            .into_inner()
            .into_inner()
            .downcast::<TokioIo<TcpStream>>()
            .ok()?,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return None;
        }
    };
    let stream = Arc::new(parts.io.into_inner());
    let attach = ShardMsg::Attach {
        key,
        id,
        stream: Arc::clone(&stream),
    };
    relay.to_shard(shard, attach).await.ok()?;
    Some((stream, parts.read_buf))
}

struct Reader {
    relay: Relay,
    slot: Slot,
    conn: Arc<ConnShared>,
    publish: Publish,
    parser: FrameReader,
    events: Vec<Event>,
}

impl Reader {
    async fn run(&mut self, stream: &TcpStream, first: Result<(), ProtocolError>) {
        let mut result = first;
        loop {
            // Boxed: see `serve`. One allocation per read that completed a frame.
            if !self.events.is_empty() && !Box::pin(self.handle_events()).await {
                return self.drain(stream).await;
            }
            if let Err(e) = result {
                tracing::debug!(error = %e, "protocol error");
                Box::pin(self.close(e.code, e.reason)).await;
                return self.drain(stream).await;
            }
            if self.parser.is_done() {
                return;
            }
            result = loop {
                if readable(stream).await.is_err() {
                    return;
                }
                match self.read(stream) {
                    Read::Bytes(r) => break r,
                    Read::NotReady => continue,
                    Read::Eof => return,
                    Read::Failed(e) => {
                        tracing::debug!(error = %e, "read failed");
                        return;
                    }
                }
            };
        }
    }

    /// One non-blocking read into the thread's scratch buffer, parsed at once.
    fn read(&mut self, stream: &TcpStream) -> Read {
        SCRATCH.with_borrow_mut(|buf| match stream.try_read(buf) {
            Ok(0) => Read::Eof,
            Ok(n) => {
                self.conn.alive.store(true, Ordering::Relaxed);
                Read::Bytes(self.parser.feed(&buf[..n], &mut self.events))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Read::NotReady,
            Err(e) => Read::Failed(e),
        })
    }

    /// Acts on parsed events in order. Returns false once the connection is closing.
    async fn handle_events(&mut self) -> bool {
        let Slot { shard, key, id } = self.slot;
        let mut events = std::mem::take(&mut self.events);
        let mut open = true;
        for event in events.drain(..) {
            if !open {
                break;
            }
            match event {
                Event::Message { opcode, payload } => {
                    if self.conn.closing.load(Ordering::Acquire) {
                        continue; // the server already sent its close; data is ignored
                    }
                    match &self.publish {
                        Publish::To(topic) => {
                            if self.relay.publish(topic, opcode, &payload).await.is_err() {
                                open = false;
                            }
                        }
                        Publish::Refuse(reason) => {
                            let reason = *reason;
                            tracing::debug!(reason, "data message refused");
                            self.close(close_code::POLICY, reason).await;
                            open = false;
                        }
                    }
                }
                Event::Ping(payload) => {
                    let msg = ShardMsg::Control {
                        key,
                        id,
                        frame: frame::pong(&payload),
                    };
                    open = self.relay.to_shard(shard, msg).await.is_ok();
                }
                Event::Pong => {}
                Event::Close { code } => {
                    let echo = code.unwrap_or(close_code::NORMAL);
                    let msg = ShardMsg::Close {
                        key,
                        id,
                        code: echo,
                        reason: "",
                        why: DisconnectReason::ClientClose,
                    };
                    let _ = self.relay.to_shard(shard, msg).await;
                    open = false;
                }
            }
        }
        // Keep the (empty) allocation only if it is small.
        if events.capacity() <= 8 {
            self.events = events;
        }
        open
    }

    async fn close(&self, code: u16, reason: &'static str) {
        let Slot { shard, key, id } = self.slot;
        let msg = ShardMsg::Close {
            key,
            id,
            code,
            reason,
            why: DisconnectReason::ProtocolError,
        };
        let _ = self.relay.to_shard(shard, msg).await;
    }

    /// After the server decided to close: read and discard until the client closes or the
    /// shard frees the connection (which shuts the socket down, ending this with end-of-file).
    /// Reading on keeps the kernel from answering the client's late bytes with a reset that
    /// could destroy our close frame before the client reads it.
    async fn drain(&mut self, stream: &TcpStream) {
        loop {
            if readable(stream).await.is_err() {
                return;
            }
            let done = SCRATCH.with_borrow_mut(|buf| match stream.try_read(buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            });
            if done {
                return;
            }
        }
    }
}
