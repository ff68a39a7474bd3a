//! A model that checks the topic ring and the outbox: it applies joins, leaves, publishes
//! (some skipping one client), control frames, partial writes of any size, trims and closes
//! to a real `Ring` and its clients' `Outbox`es, and panics unless every client reads exactly
//! the frames published since it joined and not excluded for it, in order and byte for
//! byte, with its control frames whole between them. The property test (`ring_tests.rs`)
//! and the `ring` fuzz target drive it. The budget and 4008 are the shard's (`tests.rs`
//! drives them on sockets). Compiled for tests and with feature `internals` only.

use super::ring::{Outbox, Ring};
use crate::Topic;
use crate::frame::pong;
use crate::frame::{self, Opcode};

/// One step of the model.
#[derive(Debug, Clone)]
pub enum RingOp {
    Join,
    Leave(usize),
    /// Payload length, and the client (by position, modulo their number) to skip.
    Publish(usize, Option<usize>),
    Control(usize),
    /// Client, bytes the "kernel" takes.
    Write(usize, usize),
    Trim,
    /// Client; `true`: keep the whole backlog (a drain), `false`: a slow consumer's close.
    Close(usize, bool),
}

/// One client of the model.
struct Model {
    key: usize,
    id: u64,
    out: Outbox,
    sub_index: u32,
    /// Off the ring: closed, only its side queue is left.
    detached: bool,
    /// `Some(all)` once closed.
    closed: Option<bool>,
    received: Vec<u8>,
    /// Sequence numbers of the data frames it must read, in order.
    expected: Vec<u32>,
    /// Payloads of the pongs it must read, in order.
    controls: Vec<u32>,
}

/// A frame as a client reads it.
#[derive(Debug, PartialEq)]
enum Read {
    Data(u32),
    Pong(u32),
    Close,
}

fn parse(mut buf: &[u8]) -> Vec<Read> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let opcode = buf[0] & 0x0f;
        let (len, header) = match buf[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            n => (usize::from(n), 2),
        };
        assert!(buf.len() >= header + len, "a frame was cut short");
        let payload = &buf[header..header + len];
        let seq = |p: &[u8]| u32::from_be_bytes(p[..4].try_into().expect("4 bytes"));
        out.push(match opcode {
            0x2 => {
                let n = seq(payload);
                assert!(
                    payload[4..].iter().all(|&b| b == n as u8),
                    "payload bytes of frame {n} damaged"
                );
                Read::Data(n)
            }
            0xA => Read::Pong(seq(payload)),
            0x8 => Read::Close,
            other => panic!("unexpected opcode {other}"),
        });
        buf = &buf[header + len..];
    }
    out
}

/// A ring on one topic, its clients, and what each has read.
pub struct RingModel {
    ring: Ring,
    clients: Vec<Model>,
    next_key: usize,
    next_seq: u32,
}

impl Default for RingModel {
    fn default() -> Self {
        let topic = Topic::new("t").expect("a valid topic");
        Self {
            ring: Ring::new(Box::new([topic]), 1 << 20),
            clients: Vec::new(),
            next_key: 0,
            next_seq: 0,
        }
    }
}

impl RingModel {
    fn live(&self, i: usize) -> Option<usize> {
        let n = self.clients.len();
        (n > 0).then(|| i % n)
    }

    fn ring_for(&self, c: &Model) -> Option<&Ring> {
        (!c.detached).then_some(&self.ring)
    }

    /// The kernel takes up to `n` bytes of client `i`'s next write.
    fn write(&mut self, i: usize, n: usize) {
        let c = &mut self.clients[i];
        let ring = (!c.detached).then_some(&mut self.ring);
        let received = &mut c.received;
        let step = c.out.write_step(ring, c.id, |iov| {
            let mut taken = 0;
            for s in iov {
                let t = s.len().min(n - taken);
                received.extend_from_slice(&s[..t]);
                taken += t;
            }
            Ok(taken)
        });
        step.expect("the model's writes never fail");
    }

    fn cursors(&self) -> Vec<u64> {
        self.ring
            .subs
            .iter()
            .map(|&key| {
                let c = self.clients.iter().find(|c| c.key == key);
                c.expect("every subscriber is a model client").out.cursor
            })
            .collect()
    }

    fn leave(&mut self, i: usize) {
        let (index, cursor) = (self.clients[i].sub_index, self.clients[i].out.cursor);
        if let Some(moved) = self.ring.leave(index, cursor) {
            let m = self.clients.iter_mut().find(|c| c.key == moved);
            m.expect("moved subscriber exists").sub_index = index;
        }
        self.clients[i].detached = true;
    }

    /// Applies one step and checks the ring's invariants.
    pub fn apply(&mut self, op: RingOp) {
        match op {
            RingOp::Join => {
                let key = self.next_key;
                self.next_key += 1;
                let (cursor, sub_index) = self.ring.join(key);
                self.clients.push(Model {
                    key,
                    id: 1000 + key as u64,
                    out: Outbox {
                        cursor,
                        ..Outbox::default()
                    },
                    sub_index,
                    detached: false,
                    closed: None,
                    received: Vec::new(),
                    expected: Vec::new(),
                    controls: Vec::new(),
                });
            }
            RingOp::Leave(i) => {
                if let Some(i) = self.live(i)
                    && !self.clients[i].detached
                {
                    self.leave(i);
                    self.clients.remove(i);
                }
            }
            RingOp::Publish(len, skip) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let mut payload = vec![seq as u8; len.max(4)];
                payload[..4].copy_from_slice(&seq.to_be_bytes());
                let frame = frame::encode(Opcode::Binary, &payload);
                let skip = skip.and_then(|s| self.live(s));
                let skip_id = skip.map(|s| self.clients[s].id);
                self.ring.append(&frame, skip_id);
                for (i, c) in self.clients.iter_mut().enumerate() {
                    if !c.detached && Some(i) != skip {
                        c.expected.push(seq);
                    }
                }
            }
            RingOp::Control(i) => {
                if let Some(i) = self.live(i)
                    && self.clients[i].closed.is_none()
                {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let c = &mut self.clients[i];
                    c.out.push_side(pong(&seq.to_be_bytes()));
                    c.controls.push(seq);
                }
            }
            RingOp::Write(i, n) => {
                if let Some(i) = self.live(i) {
                    self.write(i, n);
                }
            }
            RingOp::Trim => {
                if let Some(oldest) = self.cursors().into_iter().min() {
                    self.ring.trim(oldest);
                }
            }
            RingOp::Close(i, all) => {
                if let Some(i) = self.live(i)
                    && !self.clients[i].detached
                {
                    let c = &mut self.clients[i];
                    c.out.detach(&self.ring, c.id, all);
                    c.out.push_side(frame::close(1000, ""));
                    c.closed = Some(all);
                    self.leave(i);
                }
            }
        }
        self.ring.assert_consistent(&self.cursors());
        for c in &self.clients {
            let unsent = c.out.unsent(self.ring_for(c));
            let side: usize = c.out.side.iter().map(|f| f.len()).sum();
            assert_eq!(side, c.out.side_bytes, "side_bytes");
            assert!(unsent >= side);
        }
    }

    /// Writes everything every client has left, then checks what each read.
    pub fn finish(mut self) {
        for i in 0..self.clients.len() {
            for _ in 0..10_000 {
                if self.clients[i].out.unsent(self.ring_for(&self.clients[i])) == 0 {
                    break;
                }
                self.write(i, usize::MAX);
            }
            assert_eq!(
                self.clients[i].out.unsent(self.ring_for(&self.clients[i])),
                0
            );
        }
        self.ring.assert_consistent(&self.cursors());
        for c in &self.clients {
            let reads = parse(&c.received);
            let (mut data, mut pongs) = (Vec::new(), Vec::new());
            for r in &reads {
                match r {
                    Read::Data(n) => data.push(*n),
                    Read::Pong(n) => pongs.push(*n),
                    Read::Close => {}
                }
            }
            match c.closed {
                Some(false) => {
                    // A slow consumer's backlog is cut: a prefix, whole frames, then close.
                    assert!(c.expected.starts_with(&data), "{data:?} / {:?}", c.expected);
                    assert!(c.controls.starts_with(&pongs));
                }
                _ => {
                    assert_eq!(data, c.expected);
                    assert_eq!(pongs, c.controls);
                }
            }
            let closes = reads.iter().filter(|r| **r == Read::Close).count();
            assert_eq!(closes, usize::from(c.closed.is_some()));
            if c.closed.is_some() {
                assert_eq!(
                    reads.last(),
                    Some(&Read::Close),
                    "the close frame goes last"
                );
            }
        }
    }
}
