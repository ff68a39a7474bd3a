//! A topic ring and a client's outbox: the data structures of fan-out, with no I/O.
//!
//! A [`Ring`] holds the frames published to one set of topics on one shard, stored back to
//! back in one byte buffer with an index of frame starts. Every client subscribed to exactly
//! that set is a cursor into it: a publish appends its frame once, whatever the number of
//! subscribers, and a client's backlog is the bytes from its cursor to the head, which one
//! `write` hands to the kernel. Positions are absolute byte offsets into the ring's stream
//! since it was created (`u64`: they never wrap); the buffer holds `[base, head)`.
//!
//! An [`Outbox`] is what a client has left to write: its cursor, plus a small side queue of
//! frames of its own (pings, pongs, and once a close has begun, the rest of its backlog and
//! the close frame). `plan` decides the order the two go out in; `gather` and `consume` both
//! follow it, so the bytes the kernel took are accounted exactly as they were handed over.
//!
//! What does not live here: sockets and the write loop (`queue.rs`), which ring a client
//! belongs to and when a slow consumer is judged (`mod.rs`), closes (`lifecycle.rs`).

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes};

use crate::Topic;

/// Most slices handed to one vectored write. A ring backlog is one slice (more only around
/// frames the client is excluded from), so this bounds the side queue's share.
const IOV: usize = 32;

/// A frame one client must not receive (a publish that excludes its sender).
#[derive(Debug, Clone, Copy)]
struct Skip {
    start: u64,
    end: u64,
    /// The excluded client's connection id.
    id: u64,
}

/// The frames published to one topic set on one shard, and the clients reading them.
///
/// Invariants: `buf` holds the stream's bytes `[base, head)` where `head = base + buf.len()`;
/// `starts` holds, in increasing order, the start of every frame that begins at or after the
/// oldest cursor still in `subs` (it may hold older ones until the next trim); `skips` is
/// sorted by `start` and holds at most one entry per frame; every subscriber's cursor is in
/// `[base, head]` and on a frame start, or inside the frame it was writing; `behind` is the
/// number of subscribers whose cursor is below `head`. When `behind` falls to zero the
/// buffer is emptied (`base` moves to `head`), so a ring whose readers keep up holds no
/// bytes between flushes.
#[derive(Debug)]
pub(super) struct Ring {
    buf: Vec<u8>,
    base: u64,
    starts: VecDeque<u64>,
    skips: VecDeque<Skip>,
    /// Slab keys of the subscribers; a client's `sub_index` is its position here.
    pub(super) subs: Vec<usize>,
    behind: usize,
    /// Once `head` passes this, some subscriber may be over the send budget: the shard
    /// checks them all (`Shard::check_ring`) and sets the next mark.
    pub(super) check_at: u64,
    /// The most bytes the buffer held since it was last emptied: a buffer whose capacity
    /// goes mostly unused is freed when it empties, so a quiet ring holds no memory.
    recent_peak: usize,
    /// In the shard's list of rings to flush.
    pub(super) dirty: bool,
    /// The topics this ring serves, sorted, without duplicates.
    pub(super) topics: Box<[Topic]>,
    /// The shard's send budget, for the mark set when the buffer empties.
    budget: u64,
}

impl Ring {
    pub(super) fn new(topics: Box<[Topic]>, budget: usize) -> Self {
        Self {
            buf: Vec::new(),
            base: 0,
            starts: VecDeque::new(),
            skips: VecDeque::new(),
            subs: Vec::new(),
            behind: 0,
            check_at: budget as u64,
            recent_peak: 0,
            dirty: false,
            topics,
            budget: budget as u64,
        }
    }

    pub(super) fn head(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// Whether some subscriber has not written everything up to the head.
    pub(super) fn is_behind(&self) -> bool {
        self.behind > 0
    }

    /// Frames the buffer holds (a measure of how far behind the readers are).
    pub(super) fn frames(&self) -> usize {
        self.starts.len()
    }

    /// Appends one frame; `skip`: the id of a client that must not receive it. Every
    /// subscriber is behind afterwards. Returns whether the budget check is due.
    pub(super) fn append(&mut self, frame: &[u8], skip: Option<u64>) -> bool {
        let start = self.head();
        self.buf.extend_from_slice(frame);
        self.starts.push_back(start);
        if let Some(id) = skip {
            let end = self.head();
            self.skips.push_back(Skip { start, end, id });
        }
        self.recent_peak = self.recent_peak.max(self.buf.len());
        self.behind = self.subs.len();
        self.head() > self.check_at
    }

    /// Adds a subscriber; returns its cursor (the head: it gets what is published from now).
    pub(super) fn join(&mut self, key: usize) -> (u64, u32) {
        let index = u32::try_from(self.subs.len()).expect("fewer than 2^32 clients per shard");
        self.subs.push(key);
        (self.head(), index)
    }

    /// Removes the subscriber at `index`, whose cursor is `cursor`. Returns the key of the
    /// subscriber moved into `index`, whose `sub_index` the caller must update.
    pub(super) fn leave(&mut self, index: u32, cursor: u64) -> Option<usize> {
        let index = index as usize;
        self.subs.swap_remove(index);
        if cursor < self.head() {
            self.caught_up();
        }
        self.subs.get(index).copied()
    }

    /// A subscriber's cursor reached the head (or it left while behind).
    pub(super) fn caught_up(&mut self) {
        self.behind -= 1;
        if self.behind == 0 {
            self.empty();
        }
    }

    /// Every reader is at the head: drop the buffer's contents, and its memory if the last
    /// burst used little of it.
    fn empty(&mut self) {
        self.base = self.head();
        if self.buf.capacity() > 4096 && self.recent_peak < self.buf.capacity() / 4 {
            self.buf = Vec::new();
            self.starts = VecDeque::new();
        } else {
            self.buf.clear();
            self.starts.clear();
        }
        self.skips.clear();
        self.recent_peak = 0;
        self.check_at = self.base + self.budget;
    }

    /// Drops the bytes before `oldest` (the lowest cursor of any subscriber) when they are at
    /// least half the buffer, so each byte is moved at most about once.
    pub(super) fn trim(&mut self, oldest: u64) {
        let drop = (oldest - self.base) as usize;
        if drop == 0 || drop < self.buf.len() / 2 {
            return;
        }
        self.buf.drain(..drop);
        self.base = oldest;
        let keep = self.starts.partition_point(|&s| s < oldest);
        self.starts.drain(..keep);
        let keep = self.skips.partition_point(|s| s.end <= oldest);
        self.skips.drain(..keep);
    }

    /// Whether `pos` is the start of a frame (or the head).
    fn is_boundary(&self, pos: u64) -> bool {
        pos == self.head() || self.starts.binary_search(&pos).is_ok()
    }

    /// The first frame start at or after `pos`, or the head.
    pub(super) fn boundary_from(&self, pos: u64) -> u64 {
        let i = self.starts.partition_point(|&s| s < pos);
        self.starts.get(i).copied().unwrap_or(self.head())
    }

    /// `pos` moved past every frame excluded for `id` that starts exactly there.
    fn skip_own(&self, mut pos: u64, id: u64) -> u64 {
        if self.skips.is_empty() {
            return pos;
        }
        loop {
            let i = self.skips.partition_point(|s| s.start < pos);
            match self.skips.get(i) {
                Some(s) if s.start == pos && s.id == id => pos = s.end,
                _ => return pos,
            }
        }
    }

    /// The bytes `[from, to)` minus the frames excluded for `id`, as contiguous ranges.
    fn ranges(&self, from: u64, to: u64, id: u64, mut out: impl FnMut(u64, u64) -> bool) {
        let mut pos = from;
        if !self.skips.is_empty() {
            let first = self.skips.partition_point(|s| s.end <= from);
            for s in self.skips.range(first..) {
                if s.start >= to {
                    break;
                }
                if s.id == id {
                    if s.start > pos && !out(pos, s.start) {
                        return;
                    }
                    pos = s.end.max(pos);
                }
            }
        }
        if pos < to {
            out(pos, to);
        }
    }

    fn slice(&self, start: u64, end: u64) -> &[u8] {
        &self.buf[(start - self.base) as usize..(end - self.base) as usize]
    }

    /// Copies `[from, to)` minus the frames excluded for `id` out of the ring.
    pub(super) fn copy_out(&self, from: u64, to: u64, id: u64) -> Bytes {
        let mut v = Vec::with_capacity((to - from) as usize);
        self.ranges(from, to, id, |a, b| {
            v.extend_from_slice(self.slice(a, b));
            true
        });
        Bytes::from(v)
    }

    /// Bytes held, and the buffer's capacity (tests only).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.buf.len()
    }

    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Checks the invariants that `behind` and the cursors keep, given every subscriber's
    /// cursor (tests and the ring model only).
    #[cfg(any(test, feature = "internals"))]
    pub(super) fn assert_consistent(&self, cursors: &[u64]) {
        let head = self.head();
        assert_eq!(cursors.len(), self.subs.len());
        assert!(cursors.iter().all(|&c| c >= self.base && c <= head));
        let behind = cursors.iter().filter(|&&c| c < head).count();
        assert_eq!(behind, self.behind, "behind count");
    }
}

/// One piece of a client's next write.
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// Ring bytes `[start, end)`.
    Ring(u64, u64),
    /// The side queue's frame at this index.
    Side(usize),
}

/// What one client has left to write: a cursor into its ring and a side queue.
///
/// Invariants: `side_bytes` is the sum of the lengths of `side`'s frames; `side_partial` is
/// true only while the front side frame has been partly written, and then `cursor` is on a
/// frame boundary (side frames go out only between ring frames).
#[derive(Debug, Default)]
pub(super) struct Outbox {
    pub(super) cursor: u64,
    pub(super) side: VecDeque<Bytes>,
    pub(super) side_bytes: usize,
    pub(super) side_partial: bool,
}

impl Outbox {
    /// Bytes still to write from the ring (`head`: the ring's head; none without a ring) and
    /// the side queue. Frames excluded for this client count until its cursor passes them.
    pub(super) fn unsent(&self, ring: Option<&Ring>) -> usize {
        ring.map_or(0, |r| (r.head() - self.cursor) as usize) + self.side_bytes
    }

    pub(super) fn push_side(&mut self, frame: Bytes) {
        self.side_bytes += frame.len();
        self.side.push_back(frame);
    }

    /// One write of what the client has left, through `write` (which gets the slices in
    /// order and returns how many bytes it took, as `writev` does): the cursor steps over
    /// frames excluded for `id`, the write's bytes are accounted, and the ring is told when
    /// the cursor reaches its head. `Ok(None)`: nothing was left to write. The shard's write
    /// loop (`queue.rs`) and the ring model both go through here.
    pub(super) fn write_step(
        &mut self,
        mut ring: Option<&mut Ring>,
        id: u64,
        write: impl FnOnce(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<Option<usize>> {
        if let Some(r) = ring.as_deref_mut()
            && self.skip_own(r, id)
        {
            r.caught_up();
        }
        let written = {
            let mut iov = [IoSlice::new(&[]); IOV];
            let n = self.gather(ring.as_deref(), id, &mut iov);
            if n == 0 {
                return Ok(None);
            }
            write(&iov[..n])?
        };
        if self.consume(ring.as_deref(), id, written)
            && let Some(r) = ring
        {
            r.caught_up();
        }
        Ok(Some(written))
    }

    /// Moves the cursor past frames excluded for `id`. Returns true if that brought it from
    /// behind the head to the head (the caller tells the ring).
    fn skip_own(&mut self, ring: &Ring, id: u64) -> bool {
        let before = self.cursor;
        self.cursor = ring.skip_own(before, id);
        before < ring.head() && self.cursor == ring.head()
    }

    /// The order of the next write: side frames go at the first frame boundary at or after
    /// the cursor, ring bytes before and after them. Calls `out` with each piece until it
    /// returns false.
    fn plan(&self, ring: Option<&Ring>, id: u64, mut out: impl FnMut(Piece) -> bool) {
        let side =
            |out: &mut dyn FnMut(Piece) -> bool| (0..self.side.len()).all(|i| out(Piece::Side(i)));
        let Some(ring) = ring.filter(|r| self.cursor < r.head()) else {
            side(&mut out);
            return;
        };
        let head = ring.head();
        let mut more = true;
        let mut ring_part = |from: u64, to: u64, out: &mut dyn FnMut(Piece) -> bool| {
            ring.ranges(from, to, id, |a, b| {
                more = out(Piece::Ring(a, b));
                more
            });
            more
        };
        if self.side.is_empty() {
            ring_part(self.cursor, head, &mut out);
            return;
        }
        let at = if self.side_partial || ring.is_boundary(self.cursor) {
            self.cursor
        } else {
            ring.boundary_from(self.cursor)
        };
        if ring_part(self.cursor, at, &mut out) && side(&mut out) {
            ring_part(at, head, &mut out);
        }
    }

    /// Fills `iov` with the next write's slices; returns how many.
    fn gather<'a>(
        &'a self,
        ring: Option<&'a Ring>,
        id: u64,
        iov: &mut [IoSlice<'a>; IOV],
    ) -> usize {
        let mut n = 0;
        self.plan(ring, id, |piece| {
            iov[n] = IoSlice::new(match piece {
                Piece::Ring(a, b) => ring.map_or(&[][..], |r| r.slice(a, b)),
                Piece::Side(i) => &self.side[i],
            });
            n += 1;
            n < IOV
        });
        n
    }

    /// Accounts `written` bytes of the write `gather` prepared. Returns true if the cursor
    /// reached the ring's head from behind it (the caller tells the ring).
    fn consume(&mut self, ring: Option<&Ring>, id: u64, mut written: usize) -> bool {
        let before = self.cursor;
        let mut pieces = [Piece::Side(0); IOV];
        let mut n = 0;
        self.plan(ring, id, |piece| {
            pieces[n] = piece;
            n += 1;
            n < IOV
        });
        let mut popped = 0;
        for piece in &pieces[..n] {
            if written == 0 {
                break;
            }
            match *piece {
                Piece::Ring(a, b) => {
                    let len = (b - a) as usize;
                    if written >= len {
                        written -= len;
                        self.cursor = b;
                    } else {
                        self.cursor = a + written as u64;
                        written = 0;
                    }
                }
                Piece::Side(i) => {
                    debug_assert_eq!(i, popped, "side pieces come in order");
                    let Some(front) = self.side.front_mut() else {
                        break;
                    };
                    if written >= front.len() {
                        written -= front.len();
                        self.side_bytes -= front.len();
                        self.side.pop_front();
                        self.side_partial = false;
                        popped += 1;
                    } else {
                        front.advance(written);
                        self.side_bytes -= written;
                        self.side_partial = true;
                        written = 0;
                    }
                }
            }
        }
        let Some(ring) = ring else {
            return false;
        };
        self.cursor = ring.skip_own(self.cursor, id);
        before < ring.head() && self.cursor == ring.head()
    }

    /// Takes the client off its ring's bytes for a close: what it still has to receive from
    /// the ring (everything, or only the rest of a half-written frame) moves into the side
    /// queue, in order with the side frames. `all: false` (a slow consumer) also drops every
    /// side frame but a half-written one. The cursor is left where it was: the caller then
    /// takes the client off the ring with it (`Ring::leave` needs it to count `behind`).
    pub(super) fn detach(&mut self, ring: &Ring, id: u64, all: bool) {
        if !all {
            let keep = usize::from(self.side_partial);
            self.side.truncate(keep);
            self.side_bytes = self.side.iter().map(Bytes::len).sum();
        }
        let cursor = ring.skip_own(self.cursor, id);
        let to = if all {
            ring.head()
        } else if self.side_partial {
            cursor // the cursor is on a boundary: nothing of the ring is half-written
        } else {
            ring.boundary_from(cursor)
        };
        if cursor < to {
            let rest = ring.copy_out(cursor, to, id);
            self.side_bytes += rest.len();
            // After a half-written side frame, before the side frames not yet started.
            self.side.insert(usize::from(self.side_partial), rest);
        }
    }

    /// Frees the side queue's slots once it is empty, so an idle client holds no buffer.
    pub(super) fn shrink(&mut self) {
        if self.side.is_empty() && self.side.capacity() > 0 {
            self.side = VecDeque::new();
        }
    }
}
