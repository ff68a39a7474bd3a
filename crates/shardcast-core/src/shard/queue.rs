//! A client's send queue: the frames waiting for its socket, their byte count, the
//! half-written front frame, the non-blocking vectored writes that empty it, and the policy
//! that keeps or frees its slots after a burst.
//!
//! What does not live here: the send budget and the slow-consumer judgement (`mod.rs`,
//! `fan_out` and `enqueue_control`; `lifecycle.rs`), readiness futures and write timeouts
//! (`mod.rs`, `Shard::flush`), and which frames go to which client (`mod.rs`).

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes};

use crate::socket::Socket;

/// Most frames handed to one `writev`: Linux's `UIO_MAXIOV`. A client that fell behind gets
/// its backlog in a few large writes rather than many small ones, which is what lets a shard
/// catch up (per write, the kernel's cost is mostly fixed).
const MAX_IOV: usize = 1024;
/// Frames up to which the slices for a `writev` live on the stack; more take one allocation.
const STACK_IOV: usize = 64;

/// The frames queued for one client, oldest first.
///
/// Invariants: `queued` is the sum of the lengths of `frames`; `head_partial` is true only
/// while the front frame has been partly written.
#[derive(Default)]
pub(super) struct SendQueue {
    frames: VecDeque<Bytes>,
    /// The most frames `frames` held at the start of a write since it was last drained.
    /// A drained queue keeps its slots while the previous burst used a good share of them,
    /// so a client that gets hundreds of frames per flush does not reallocate its queue
    /// from empty every flush; it is freed once a drain finds it mostly unused.
    recent_peak: usize,
    queued: usize,
    head_partial: bool,
}

/// How a write left the queue.
pub(super) enum Flush {
    /// Everything queued was written.
    Drained,
    /// The kernel took no more (or there is no socket yet); bytes are left.
    Blocked,
}

impl SendQueue {
    /// Bytes queued.
    pub(super) fn queued(&self) -> usize {
        self.queued
    }

    /// Frames queued, a partly written one included.
    pub(super) fn len(&self) -> usize {
        self.frames.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub(super) fn push(&mut self, frame: Bytes) {
        self.queued += frame.len();
        self.frames.push_back(frame);
    }

    /// Discards every frame except a half-written front one, which must be finished for what
    /// follows it to be readable (a slow consumer's close frame).
    pub(super) fn discard_backlog(&mut self) {
        let keep = usize::from(self.head_partial);
        self.frames.truncate(keep);
        self.queued = self.frames.iter().map(Bytes::len).sum();
    }

    #[cfg(test)]
    pub(super) fn head_partial(&self) -> bool {
        self.head_partial
    }

    /// Slots held, used or not.
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.frames.capacity()
    }

    /// Forgets every frame, as if written (the bench fixture).
    #[cfg(feature = "internals")]
    pub(super) fn clear(&mut self) {
        self.frames.clear();
        self.queued = 0;
    }

    /// Writes as much of the queue to `stream` as the kernel takes, `MAX_IOV` frames per
    /// syscall, and adds the bytes written to `sent`.
    pub(super) fn write_some(&mut self, stream: &Socket, sent: &mut u64) -> io::Result<Flush> {
        self.recent_peak = self.recent_peak.max(self.frames.len());
        while let Some(front) = self.frames.front() {
            let result = if self.frames.len() == 1 {
                // The common case at a steady rate: one frame, a plain `write`.
                stream.try_write(front)
            } else if self.frames.len() <= STACK_IOV {
                let mut iov = [IoSlice::new(&[]); STACK_IOV];
                let mut n = 0;
                for (slot, frame) in iov.iter_mut().zip(self.frames.iter()) {
                    *slot = IoSlice::new(frame);
                    n += 1;
                }
                stream.try_write_vectored(&iov[..n])
            } else {
                // A backlog: one allocation for up to `MAX_IOV` frames in one syscall.
                let iov: Vec<IoSlice<'_>> = self
                    .frames
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
                let Some(front) = self.frames.front_mut() else {
                    break;
                };
                if front.len() <= written {
                    written -= front.len();
                    self.frames.pop_front();
                    self.head_partial = false;
                } else {
                    front.advance(written);
                    self.head_partial = true;
                    written = 0;
                }
            }
        }
        let capacity = self.frames.capacity();
        if capacity > 64 && self.recent_peak < capacity / 4 {
            // Hand back a burst's worth of slots once they go mostly unused: idle clients
            // hold no large buffers (an idle client's next ping drains with a peak of 1).
            self.frames = VecDeque::new();
        }
        self.recent_peak = 0;
        Ok(Flush::Drained)
    }
}
