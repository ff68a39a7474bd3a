//! Encodes an arbitrary payload with `shardcast::frame::encode` and decodes the header by hand
//! (RFC 6455 §5.2): final bit, opcode, no mask, the shortest length form, the payload intact.
//!
//! Input layout: byte 0 picks the opcode and, with bytes 1 to 3, an optional length past the
//! input (so the 16- and 64-bit length forms are reached even with short inputs); the rest is
//! the payload, repeated to that length when one is asked for.
#![no_main]

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
        // Up to 128 KiB: past both the 125-byte and the 65535-byte length boundaries.
        let len = u32::from_le_bytes([*l0, *l1, *l2, 0]) as usize % (128 * 1024 + 1);
        body.iter().copied().cycle().take(len).collect()
    } else {
        body.to_vec()
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
});
