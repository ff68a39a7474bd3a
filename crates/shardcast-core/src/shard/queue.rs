//! A client's send queue: pushing frames, the non-blocking vectored writes that empty it
//! (`write_some`), dropping a slow consumer's backlog, and the policy that keeps or frees the
//! queue's slots after a burst. The fields it works on (`queue`, `recent_peak`, `queued`,
//! `head_partial`) are declared, with their invariants, on `Client` in `mod.rs`.
//!
//! What does not live here: the send budget and the slow-consumer judgement (`mod.rs`,
//! `fan_out` and `enqueue_control`; `lifecycle.rs`), readiness futures and write timeouts
//! (`mod.rs`, `Shard::flush`), and which frames go to which client (`mod.rs`).

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes};

use super::Client;

/// Most frames handed to one `writev`: Linux's `UIO_MAXIOV`. A client that fell behind gets
/// its backlog in a few large writes rather than many small ones, which is what lets a shard
/// catch up (per write, the kernel's cost is mostly fixed).
const MAX_IOV: usize = 1024;
/// Frames up to which the slices for a `writev` live on the stack; more take one allocation.
const STACK_IOV: usize = 64;

pub(super) enum Flush {
    Drained,
    Blocked,
}

impl Client {
    /// Writes as much of the queue as the kernel takes, `MAX_IOV` frames per syscall, and adds
    /// the bytes written to `sent`.
    pub(super) fn write_some(&mut self, sent: &mut u64) -> io::Result<Flush> {
        let Some(stream) = self.stream.as_ref() else {
            return Ok(Flush::Blocked);
        };
        self.recent_peak = self.recent_peak.max(self.queue.len());
        while let Some(front) = self.queue.front() {
            let result = if self.queue.len() == 1 {
                // The common case at a steady rate: one frame, a plain `write`.
                stream.try_write(front)
            } else if self.queue.len() <= STACK_IOV {
                let mut iov = [IoSlice::new(&[]); STACK_IOV];
                let mut n = 0;
                for (slot, frame) in iov.iter_mut().zip(self.queue.iter()) {
                    *slot = IoSlice::new(frame);
                    n += 1;
                }
                stream.try_write_vectored(&iov[..n])
            } else {
                // A backlog: one allocation for up to `MAX_IOV` frames in one syscall.
                let iov: Vec<IoSlice<'_>> = self
                    .queue
                    .iter()
                    .take(MAX_IOV)
                    .map(|frame| IoSlice::new(frame))
                    .collect();
                stream.try_write_vectored(&iov)
            };
            let mut written = match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) => return Err(e),
            };
            self.queued -= written;
            *sent += written as u64;
            while written > 0 {
                // The kernel never reports more bytes than the slices held.
                let Some(front) = self.queue.front_mut() else {
                    break;
                };
                if front.len() <= written {
                    written -= front.len();
                    self.queue.pop_front();
                    self.head_partial = false;
                } else {
                    front.advance(written);
                    self.head_partial = true;
                    written = 0;
                }
            }
        }
        // A sealed (TLS) stream may still hold the output of the last write: the client is
        // not drained until that reaches the kernel too (see `socket::Sealed`).
        if !stream.try_flush()? {
            return Ok(Flush::Blocked);
        }
        let capacity = self.queue.capacity();
        if capacity > 64 && self.recent_peak < capacity / 4 {
            // Hand back a burst's worth of slots once they go mostly unused: idle clients
            // hold no large buffers (an idle client's next ping drains with a peak of 1).
            self.queue = VecDeque::new();
        }
        self.recent_peak = 0;
        Ok(Flush::Drained)
    }

    pub(super) fn push(&mut self, frame: Bytes) {
        self.queued += frame.len();
        self.queue.push_back(frame);
    }

    /// Discards every frame except a half-written front one, which must be finished for what
    /// follows it to be readable (a slow consumer's close frame).
    pub(super) fn discard_backlog(&mut self) {
        let keep = usize::from(self.head_partial);
        self.queue.truncate(keep);
        self.queued = self.queue.iter().map(Bytes::len).sum();
    }
}
