//! Feeds arbitrary client bytes to the server's frame parser, split at input-derived points.
//!
//! Input layout: byte 0 and 1 choose the message size limit, byte 2 seeds the chunk sizes,
//! the rest is the wire. Invariants checked:
//! - no panic;
//! - after an error or a close event, further feeds return `Ok` and produce no events;
//! - every text message is valid UTF-8, every ping payload is at most 125 bytes;
//! - no message payload exceeds the limit, and the parser never holds more than the limit
//!   plus one control payload;
//! - the outcome (events and error) does not depend on how the wire is split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::Opcode;
use shardcast::reader::{Event, FrameReader, ProtocolError};

/// Events and the first error, if any, from feeding `pieces` one after the other.
fn run<'a>(
    max: usize,
    pieces: impl Iterator<Item = &'a [u8]>,
) -> (Vec<Event>, Option<ProtocolError>) {
    let mut reader = FrameReader::new(max);
    let mut out = Vec::new();
    let mut error = None;
    let mut ended = false;
    for piece in pieces {
        let before = out.len();
        let res = reader.feed(piece, &mut out);
        assert!(
            reader.buffered() <= max + 125,
            "{} bytes buffered with a limit of {max}",
            reader.buffered()
        );
        if ended {
            assert_eq!(res, Ok(()), "feed after the end must be a no-op");
            assert_eq!(out.len(), before, "events after an error or a close");
            continue;
        }
        for event in &out[before..] {
            check(max, event);
        }
        if let Some(pos) = out[before..]
            .iter()
            .position(|e| matches!(e, Event::Close { .. }))
        {
            assert_eq!(
                before + pos + 1,
                out.len(),
                "events after a close in the same feed"
            );
            ended = true;
        }
        if let Err(e) = res {
            assert!(
                matches!(e.code, 1002 | 1007 | 1009),
                "unexpected close code {}",
                e.code
            );
            error = Some(e);
            ended = true;
        }
        if ended {
            assert!(
                reader.is_done(),
                "parser not done after an error or a close"
            );
        }
    }
    (out, error)
}

fn check(max: usize, event: &Event) {
    match event {
        Event::Message { opcode, payload } => {
            assert!(
                payload.len() <= max,
                "message of {} bytes over limit {max}",
                payload.len()
            );
            if *opcode == Opcode::Text {
                assert!(
                    std::str::from_utf8(payload).is_ok(),
                    "text message is not utf-8"
                );
            }
        }
        Event::Ping(payload) => assert!(payload.len() <= 125, "ping payload over 125 bytes"),
        Event::Pong | Event::Close { .. } => {}
    }
}

/// Splits `wire` into pieces of 1 to 100 bytes drawn from a small LCG seeded by `seed`.
fn split(wire: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    let mut pieces = Vec::new();
    let mut rest = wire;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = 1 + (state >> 16) as usize % 100;
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

fuzz_target!(|data: &[u8]| {
    let [a, b, seed, wire @ ..] = data else {
        return;
    };
    // Limits from 1 byte up to a little over 64 KiB, most of them small enough to be hit.
    let max = 1 + (usize::from(u16::from_le_bytes([*a, *b])) >> (b % 8));
    let whole = run(max, std::iter::once(wire));
    let split_up = run(max, split(wire, *seed).into_iter());
    assert_eq!(whole, split_up, "outcome depends on the split");
    // One byte at a time; once the parser has ended, a further valid ping must be ignored.
    let ended = whole.1.is_some() || matches!(whole.0.last(), Some(Event::Close { .. }));
    let ping: &[u8] = if ended { b"\x89\x80\0\0\0\0" } else { b"" };
    let bytes = run(max, wire.chunks(1).chain([ping]));
    assert_eq!(whole, bytes, "outcome differs when fed byte by byte");
});
