//! How a client leaves its shard: the open and closing phases, dropping slow consumers,
//! starting a close (`begin_close`), the half-close once the close frame is out
//! (`close_progress`) and freeing the client (`finalize`).
//!
//! What does not live here: the timers that start or end closes (pong deadline, write check,
//! close deadline, drain: `timers.rs`), the budget check that finds slow consumers
//! (`mod.rs`, `check_ring`), and the rings and outboxes themselves (`ring.rs`).

use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Client, Shard, Timer, TimerKind};
use crate::DisconnectReason;
use crate::frame::{self, close_code};

/// How long a close frame may take to flush after a slow-consumer, pong-timeout or
/// protocol-error close before the socket is closed anyway.
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(1);

pub(super) enum Phase {
    Open,
    /// A close frame is queued after what is left of the backlog, in the side queue. The
    /// client is off its ring.
    Closing {
        why: DisconnectReason,
        reader_gone: bool,
        write_shut: bool,
    },
}

impl Client {
    pub(super) fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }
}

/// Why a client that is being freed leaves: the reason its close was started for, or, if
/// none was, the client's own doing.
pub(super) fn closing_reason(c: &Client) -> DisconnectReason {
    match c.phase {
        Phase::Closing { why, .. } => why,
        Phase::Open => DisconnectReason::ClientClose,
    }
}

impl Shard {
    pub(super) fn doom(&mut self, key: usize) {
        let c = &mut self.clients[key];
        if !c.doomed {
            c.doomed = true;
            self.doomed.push(key);
        }
    }

    /// Starts closing the slow consumers found since the last call.
    pub(super) fn close_doomed(&mut self) {
        while let Some(key) = self.doomed.pop() {
            if self.clients.contains(key) {
                self.clients[key].doomed = false;
                tracing::debug!(shard = self.index, key, "dropping slow consumer");
                self.begin_close(
                    key,
                    close_code::SLOW_CONSUMER,
                    "slow consumer",
                    DisconnectReason::SlowConsumer,
                    CLOSE_GRACE,
                );
            }
        }
    }

    /// Starts closing a client: its backlog moves out of its ring into its side queue, the
    /// close frame after it, and it gets `grace` to flush. A slow consumer's backlog is
    /// discarded first (except a half-written frame, which must be finished for the close
    /// frame to be readable).
    pub(super) fn begin_close(
        &mut self,
        key: usize,
        code: u16,
        reason: &str,
        why: DisconnectReason,
        grace: Duration,
    ) {
        let deadline = self.now_tick() + self.ticks(grace);
        let c = &mut self.clients[key];
        if !c.is_open() {
            return;
        }
        c.conn.closing.store(true, Ordering::Release);
        c.phase = Phase::Closing {
            why,
            reader_gone: false,
            write_shut: false,
        };
        // Counted when the reason is decided; `finalize` counts only clients never closed.
        self.disconnects.record(why);
        let c = &mut self.clients[key];
        let id = c.id;
        let attached = c.stream.is_some();
        if let Some(ring) = c.ring.and_then(|r| self.rings.get(r as usize)) {
            // The backlog goes ahead of the close frame; a slow consumer's is discarded
            // except the rest of a half-written frame.
            let all = why != DisconnectReason::SlowConsumer;
            c.out.detach(ring, id, all);
        }
        c.out.push_side(frame::close(code, reason));
        self.leave_ring(key);
        if !attached {
            self.finalize(key, why);
            return;
        }
        self.wheel.schedule(
            deadline,
            Timer {
                key,
                id,
                kind: TimerKind::CloseDeadline,
            },
        );
        // Every caller ends its batch with `end_batch`, which flushes dirty clients.
        self.mark_dirty(key);
    }

    /// Called when a closing client's queue (ending in the close frame) has been written.
    pub(super) fn close_progress(&mut self, key: usize) {
        let c = &mut self.clients[key];
        let Phase::Closing {
            why,
            reader_gone,
            write_shut,
        } = &mut c.phase
        else {
            return;
        };
        if *reader_gone {
            let why = *why;
            self.finalize(key, why);
            return;
        }
        if !*write_shut {
            *write_shut = true;
            if let Some(s) = &c.stream {
                // Half-close: the client sees our FIN after the close frame and can answer.
                s.shutdown(Shutdown::Write);
            }
        }
    }

    /// Frees a client: its topics, its queue, its socket and its admission.
    pub(super) fn finalize(&mut self, key: usize, why: DisconnectReason) {
        if !self.clients.contains(key) {
            return;
        }
        self.leave_ring(key);
        let c = self.clients.remove(key);
        if c.is_open() {
            self.disconnects.record(why);
        }
        c.conn.closing.store(true, Ordering::Release);
        if let Some(s) = &c.stream {
            // Wakes the reader with end-of-file if it is still waiting.
            s.shutdown(Shutdown::Both);
        }
        tracing::debug!(
            shard = self.index,
            key,
            id = c.id,
            reason = why.as_str(),
            "client freed"
        );
    }
}
