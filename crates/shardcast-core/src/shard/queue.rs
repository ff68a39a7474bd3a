//! A client's writes: the non-blocking vectored writes that hand its ring backlog and side
//! queue to the kernel (`write_some`). The order of what goes out and the accounting of what
//! the kernel took live in `ring.rs` (`Outbox`); this file only loops over the socket.
//!
//! What does not live here: the send budget and the slow-consumer judgement (`mod.rs`,
//! `check_ring` and `enqueue_control`; `lifecycle.rs`), readiness futures and write timeouts
//! (`mod.rs`, `Shard::flush`), and which ring a client reads (`mod.rs`).

use std::io;

use super::Client;
use super::ring::Ring;

pub(super) enum Flush {
    Drained,
    Blocked,
}

impl Client {
    /// Writes as much of the client's backlog as the kernel takes (a ring backlog is one
    /// slice, so usually one syscall whatever the number of frames) and adds the bytes
    /// written to `sent`. `ring`: the client's ring, while it has one.
    pub(super) fn write_some(
        &mut self,
        mut ring: Option<&mut Ring>,
        sent: &mut u64,
    ) -> io::Result<Flush> {
        let Some(stream) = self.stream.as_ref() else {
            return Ok(Flush::Blocked);
        };
        loop {
            let step = self
                .out
                .write_step(ring.as_deref_mut(), self.id, |iov| match iov {
                    // The common case: one slice, a plain `write`.
                    [one] => stream.try_write(one),
                    _ => stream.try_write_vectored(iov),
                });
            match step {
                Ok(None) => break,
                Ok(Some(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Some(w)) => *sent += w as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) => return Err(e),
            }
        }
        // A sealed (TLS) stream may still hold the output of the last write: the client is
        // not drained until that reaches the kernel too (see `socket::Sealed`).
        if !stream.try_flush()? {
            return Ok(Flush::Blocked);
        }
        self.out.shrink();
        Ok(Flush::Drained)
    }
}
