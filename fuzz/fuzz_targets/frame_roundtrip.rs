//! Encodes an arbitrary payload with `shardcast::frame::encode`, then decodes it with
//! fastwebsockets' reader (as a client would) and by hand (RFC 6455 §5.2): the same opcode and
//! payload must come back, with the final bit, no mask and the shortest length form.
//!
//! Input layout: byte 0 picks the opcode and, with bytes 1 to 3, an optional length past the
//! input (up to 1 KiB, or with bit 2 just past 64 KiB, so the 16- and 64-bit length forms are
//! reached even with short inputs); the rest is the payload, repeated to that length when one
//! is asked for.
#![no_main]

use fastwebsockets::{OpCode, Role, WebSocket};
use libfuzzer_sys::fuzz_target;
use shardcast::Opcode;
use shardcast::frame::{encode, header_len};

fuzz_target!(|data: &[u8]| {
    let [flags, l0, l1, l2, body @ ..] = data else {
        return;
    };
    let opcode = if flags & 1 == 0 {
        Opcode::Text
    } else {
        Opcode::Binary
    };
    let payload: Vec<u8> = if flags & 2 != 0 && !body.is_empty() {
        // Past the 125-byte boundary, or (flag 4) past the 65535-byte one; most lengths stay
        // small so the target runs fast.
        let cap = if flags & 4 != 0 { 65536 + 512 } else { 1024 };
        let len = u32::from_le_bytes([*l0, *l1, *l2, 0]) as usize % (cap + 1);
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            let n = body.len().min(len - v.len());
            v.extend_from_slice(&body[..n]);
        }
        v
    } else {
        body.to_vec()
    };

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
    let mut ws = WebSocket::after_handshake(std::io::Cursor::new(frame.to_vec()), Role::Client);
    ws.set_auto_close(false);
    ws.set_auto_pong(false);
    ws.set_max_message_size(1 << 20); // lossy text can triple 128 KiB
    // An in-memory cursor never makes the read wait.
    let read = futures_executor::block_on(ws.read_frame()).expect("fastwebsockets decodes it");
    let theirs = match read.opcode {
        OpCode::Text => Opcode::Text,
        OpCode::Binary => Opcode::Binary,
        other => panic!("decoded as {other:?}"),
    };
    assert_eq!(theirs, opcode, "opcode round trip");
    assert!(read.fin, "a single final frame");
    assert_eq!(&read.payload[..], &payload[..], "payload round trip");
});
