//! Encodes with the server's frame encoders, then decodes with fastwebsockets' reader (as a
//! client would) and, for data frames, by hand (RFC 6455 §5.2): the same opcode and payload
//! must come back, with the final bit, no mask and the shortest length form.
//!
//! Input layout: byte 0 picks the encoder (bits 3-4: `frame::encode`, `frame::pong`,
//! `frame::ping`, `frame::close`), the data opcode (bit 0) and, with bytes 1 to 3, an optional
//! length past the input (bit 1: up to 1 KiB, or with bit 2 just past 64 KiB, so the 16- and
//! 64-bit length forms are reached even with short inputs; a pong's is at most 125); the rest
//! is the payload, repeated to that length when one is asked for. A close takes its code from
//! bytes 1-2 and its reason from the payload, as text.
#![no_main]

use fastwebsockets::{OpCode, Role, WebSocket};
use libfuzzer_sys::fuzz_target;
use shardcast_core::Opcode;
use shardcast_core::frame::{encode, header_len};
use shardcast_server::fuzzing::control;

/// Close codes the server sends (`frame::close_code`).
const SERVER_CODES: [u16; 8] = [1000, 1001, 1002, 1007, 1008, 1009, 4008, 4012];

/// A frame as fastwebsockets decoded it.
struct Read {
    fin: bool,
    opcode: OpCode,
    payload: Vec<u8>,
}

/// Decodes one frame with fastwebsockets as a client. With `auto_close`, it also checks a
/// close frame's code and reason as a client would.
fn decode(frame: &[u8], auto_close: bool) -> Read {
    let mut ws = WebSocket::after_handshake(std::io::Cursor::new(frame.to_vec()), Role::Client);
    ws.set_auto_close(auto_close);
    ws.set_auto_pong(false);
    ws.set_max_message_size(1 << 20); // lossy text can triple 128 KiB
    // An in-memory cursor never makes the read wait.
    let read = futures_executor::block_on(ws.read_frame()).expect("fastwebsockets decodes it");
    Read {
        fin: read.fin,
        opcode: read.opcode,
        payload: read.payload.to_vec(),
    }
}

/// `body` repeated up to a length taken from `len` (at most `cap`) with flag bit 1, or as is.
fn payload(flags: u8, len: [u8; 3], body: &[u8], cap: usize) -> Vec<u8> {
    if flags & 2 == 0 || body.is_empty() {
        return body.to_vec();
    }
    let len = u32::from_le_bytes([len[0], len[1], len[2], 0]) as usize % (cap + 1);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let n = body.len().min(len - v.len());
        v.extend_from_slice(&body[..n]);
    }
    v
}

/// A pong echoes a client's ping payload, at most 125 bytes.
fn pong(flags: u8, len: [u8; 3], body: &[u8]) {
    let mut payload = payload(flags, len, body, 125);
    payload.truncate(125);
    let frame = control::pong(&payload);
    assert_eq!(frame[0], 0x8A, "FIN set, RSV clear, pong");
    assert_eq!(
        usize::from(frame[1]),
        payload.len(),
        "unmasked, 7-bit length"
    );
    assert_eq!(&frame[2..], &payload[..], "payload intact");
    let read = decode(&frame, false);
    assert_eq!(read.opcode, OpCode::Pong);
    assert!(read.fin, "a single final frame");
    assert_eq!(&read.payload[..], &payload[..], "pong payload round trip");
}

fn ping() {
    let frame = control::ping();
    assert_eq!(&frame[..], &[0x89, 0x00], "an empty, final, unmasked ping");
    let read = decode(&frame, false);
    assert_eq!(read.opcode, OpCode::Ping);
    assert!(read.fin && read.payload.is_empty(), "empty final ping");
}

/// A close carries the code and the longest prefix of the reason, cut on a character
/// boundary, that fits in 123 bytes.
fn close(code: [u8; 2], body: &[u8]) {
    let code = u16::from_be_bytes(code);
    let reason = String::from_utf8_lossy(body);
    let frame = control::close(code, &reason);
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    assert!(
        reason.len() <= 123 || end > 119,
        "cut more than one character"
    );
    let mut expected = code.to_be_bytes().to_vec();
    expected.extend_from_slice(&reason.as_bytes()[..end]);
    assert_eq!(frame[0], 0x88, "FIN set, RSV clear, close");
    assert_eq!(
        usize::from(frame[1]),
        expected.len(),
        "unmasked, 7-bit length"
    );
    assert!(expected.len() <= 125, "control payload over 125 bytes");
    let read = decode(&frame, false);
    assert_eq!(read.opcode, OpCode::Close);
    assert!(read.fin, "a single final frame");
    assert_eq!(&read.payload[..], &expected[..], "close payload round trip");
    if SERVER_CODES.contains(&code) {
        // A client that checks close frames accepts every close the server sends.
        let read = decode(&frame, true);
        assert_eq!(read.opcode, OpCode::Close, "close {code} accepted");
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, l0, l1, l2, body @ ..] = data else {
        return;
    };
    match (flags >> 3) & 3 {
        1 => return pong(*flags, [*l0, *l1, *l2], body),
        2 => return ping(),
        3 => return close([*l0, *l1], body),
        _ => {}
    }
    let opcode = if flags & 1 == 0 {
        Opcode::Text
    } else {
        Opcode::Binary
    };
    // Past the 125-byte boundary, or (flag 4) past the 65535-byte one; most lengths stay small
    // so the target runs fast.
    let cap = if flags & 4 != 0 { 65536 + 512 } else { 1024 };
    let payload = payload(*flags, [*l0, *l1, *l2], body, cap);

    // The relay only encodes text it has checked (client text, HTTP text bodies), so a text
    // payload here is made valid UTF-8 first.
    let payload = match opcode {
        Opcode::Text => match String::from_utf8(payload) {
            Ok(s) => s.into_bytes(),
            Err(e) => String::from_utf8_lossy(e.as_bytes())
                .into_owned()
                .into_bytes(),
        },
        Opcode::Binary => payload,
    };
    let frame = encode(opcode, &payload);
    let len = payload.len();

    let expected_opcode = match opcode {
        Opcode::Text => 0x1,
        Opcode::Binary => 0x2,
    };
    assert!(frame.len() >= 2);
    assert_eq!(
        frame[0],
        0x80 | expected_opcode,
        "FIN set, RSV clear, opcode"
    );
    assert_eq!(frame[1] & 0x80, 0, "server frames are never masked");
    let (decoded_len, hdr) = match frame[1] & 0x7F {
        126 => {
            let n = u16::from_be_bytes([frame[2], frame[3]]) as u64;
            assert!(n >= 126, "16-bit length {n} is not the shortest form");
            (n, 4)
        }
        127 => {
            // An 8-byte slice always converts to [u8; 8].
            let n = u64::from_be_bytes(frame[2..10].try_into().unwrap());
            assert_eq!(n >> 63, 0, "64-bit length has its top bit set");
            assert!(n > 65535, "64-bit length {n} is not the shortest form");
            (n, 10)
        }
        n => (u64::from(n), 2),
    };
    assert_eq!(decoded_len, len as u64, "decoded length");
    assert_eq!(hdr, header_len(len), "header_len agrees with the encoding");
    assert_eq!(frame.len(), hdr + len, "frame length");
    assert_eq!(&frame[hdr..], &payload[..], "payload intact");

    // fastwebsockets, reading as a client, gets the same frame back.
    let read = decode(&frame, false);
    let theirs = match read.opcode {
        OpCode::Text => Opcode::Text,
        OpCode::Binary => Opcode::Binary,
        other => panic!("decoded as {other:?}"),
    };
    assert_eq!(theirs, opcode, "opcode round trip");
    assert!(read.fin, "a single final frame");
    assert_eq!(&read.payload[..], &payload[..], "payload round trip");
});
