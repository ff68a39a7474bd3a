//! Arbitrary client bytes after an established upgrade, through the server's production read
//! path (`shardcast_server::fuzzing::server_read`: `conn.rs`'s reader over a `UnixStream` pair, with
//! the shard's inbox observed), and through its frame parser alone, split at input-derived
//! points.
//!
//! Input layout: bytes 0 and 1 choose the message size limit, byte 2 seeds the split points,
//! byte 3 the connection (bits 0-1: may publish, multi-topic, no publish right, may publish;
//! bit 2: a publish rate of 1 + bits 3-4 messages a second; bits 5-7: bytes sent with the
//! upgrade request, in steps of 3), the rest is the wire. Invariants checked:
//! - no panic, and the reader ends (libFuzzer's `-timeout` catches a hang);
//! - every close the reader asks for has a code the server may send: 1002, 1007, 1008 or 1009
//!   of its own, or the echo of a valid client code; at most one close, and nothing after it;
//! - published frames carry at most the limit, text is UTF-8; pongs carry at most 125 bytes;
//! - the parser never holds more than the limit plus one control payload (`buffered()`);
//! - what the reader sends its shard is what the parser's events call for (publish, pong,
//!   echo, 1008 for data without a publish right or past the rate, the parser's close code);
//! - the parser alone: after an error or a close, further feeds return `Ok` and produce no
//!   events, and the outcome does not depend on how the wire is split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast_server::fuzzing::{Access, Options, Sent, control, server_read, split_frame};
use shardcast_core::reader::{Event, FrameReader, ProtocolError};
use shardcast_core::{DisconnectReason, Opcode};

/// Close codes the server ever sends (`frame::close_code`).
const SERVER_CODES: [u16; 8] = [1000, 1001, 1002, 1007, 1008, 1009, 4008, 4012];
/// Close codes the reader chooses itself.
const READER_CODES: [u16; 4] = [1002, 1007, 1008, 1009];

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

/// Sizes of 1 to 100 bytes drawn from a small LCG seeded by `seed`, covering `len` bytes.
fn sizes(len: usize, seed: u8) -> Vec<usize> {
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = (1 + (state >> 16) as usize % 100).min(left);
        out.push(n);
        left -= n;
    }
    out
}

fn pieces<'a>(wire: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut rest = wire;
    sizes
        .iter()
        .map(|&n| {
            let (piece, tail) = rest.split_at(n);
            rest = tail;
            piece
        })
        .collect()
}

/// Checks what the production reader sent its shard against the parser's events.
fn check_reader(
    max: usize,
    options: &Options,
    parsed: &(Vec<Event>, Option<ProtocolError>),
    sent: &[Sent],
) {
    // Shape of every message, whatever the model says.
    for (i, s) in sent.iter().enumerate() {
        match s {
            Sent::Publish(frame) => {
                let (first, payload) = split_frame(frame).expect("a well-formed data frame");
                assert!(payload.len() <= max, "published {} bytes", payload.len());
                match first {
                    0x81 => assert!(std::str::from_utf8(payload).is_ok(), "text not utf-8"),
                    0x82 => {}
                    b => panic!("published frame starts with {b:#x}"),
                }
            }
            Sent::Control(frame) => {
                let (first, payload) = split_frame(frame).expect("a well-formed pong");
                assert_eq!(first, 0x8A, "the reader sends only pongs");
                assert!(payload.len() <= 125, "pong of {} bytes", payload.len());
            }
            Sent::Close { code, why, .. } => {
                assert_eq!(i + 1, sent.len(), "messages after the close: {sent:?}");
                if *why == DisconnectReason::ClientClose {
                    assert!(
                        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999),
                        "echoed close code {code}"
                    );
                } else {
                    assert!(READER_CODES.contains(code), "close code {code}");
                    assert!(SERVER_CODES.contains(code), "close code {code}");
                }
            }
            Sent::Unexpected(what) => panic!("the reader sent the shard {what}"),
        }
    }

    // What the events call for. The rate is per second of the real clock: the first `rate`
    // messages always pass, later ones may.
    let (events, error) = parsed;
    let mut sent = sent.iter();
    let mut published = 0;
    let mut next = || sent.next().cloned();
    for event in events {
        match event {
            Event::Message { opcode, payload } => {
                let got = next();
                if let Some(rate) = options.publish_rate
                    && let Some(Sent::Close {
                        code,
                        reason,
                        why: DisconnectReason::RateLimited,
                    }) = &got
                {
                    assert!(published >= rate, "rate {rate} closed after {published}");
                    assert_eq!((*code, *reason), (1008, "publish rate exceeded"));
                    assert_eq!(next(), None, "after the rate close");
                    return;
                }
                match options.access.refusal() {
                    None => {
                        let frame = shardcast_core::frame::encode(*opcode, payload);
                        assert_eq!(got, Some(Sent::Publish(frame)), "a publish");
                        published += 1;
                    }
                    Some(reason) => {
                        let close = Sent::Close {
                            code: 1008,
                            reason,
                            why: DisconnectReason::ProtocolError,
                        };
                        assert_eq!(got, Some(close), "data refused");
                        assert_eq!(next(), None, "after the refusal");
                        return;
                    }
                }
            }
            Event::Ping(payload) => {
                assert_eq!(next(), Some(Sent::Control(control::pong(payload))), "pong");
            }
            Event::Pong => {}
            Event::Close { code } => {
                let echo = Sent::Close {
                    code: code.unwrap_or(1000),
                    reason: "",
                    why: DisconnectReason::ClientClose,
                };
                assert_eq!(next(), Some(echo), "the client's close echoed");
                assert_eq!(next(), None, "after the client's close");
                return;
            }
        }
    }
    let expected = error.map(|e| Sent::Close {
        code: e.code,
        reason: e.reason,
        why: DisconnectReason::ProtocolError,
    });
    assert_eq!(next(), expected, "the parser's error, or nothing");
    assert_eq!(next(), None, "nothing after the end");
}

fuzz_target!(|data: &[u8]| {
    let [a, b, seed, opts, wire @ ..] = data else {
        return;
    };
    // Limits from 1 byte up to a little over 64 KiB, most of them small enough to be hit.
    let max = 1 + (usize::from(u16::from_le_bytes([*a, *b])) >> (b % 8));

    // The parser alone: whole, split at random points, byte by byte.
    let whole = run(max, std::iter::once(wire));
    let split_up = run(max, pieces(wire, &sizes(wire.len(), *seed)).into_iter());
    assert_eq!(whole, split_up, "outcome depends on the split");
    // Once the parser has ended, a further valid ping must be ignored.
    let ended = whole.1.is_some() || matches!(whole.0.last(), Some(Event::Close { .. }));
    let ping: &[u8] = if ended { b"\x89\x80\0\0\0\0" } else { b"" };
    let bytes = run(max, wire.chunks(1).chain([ping]));
    assert_eq!(whole, bytes, "outcome differs when fed byte by byte");

    // The production reader.
    let access = match opts & 3 {
        1 => Access::MultiTopic,
        2 => Access::NoPublishRight,
        _ => Access::Publish,
    };
    let options = Options {
        max_message_bytes: max,
        access,
        publish_rate: (opts & 4 != 0).then_some(1 + u32::from((opts >> 3) & 3)),
        leftover: usize::from(opts >> 5) * 3,
        // A few writes; the rest of the wire goes in one more.
        writes: sizes(wire.len(), seed.wrapping_add(1))
            .into_iter()
            .take(usize::from(*seed % 8))
            .collect(),
    };
    let outcome = server_read(wire, &options);
    assert!(outcome.gone, "the reader did not tell the shard it is gone");
    assert!(
        outcome.peak_buffered <= max + 125,
        "{} bytes buffered with a limit of {max}",
        outcome.peak_buffered
    );
    check_reader(max, &options, &whole, &outcome.sent);
});
