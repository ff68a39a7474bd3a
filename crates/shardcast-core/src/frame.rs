//! Server-to-client frame encoding: a whole frame (header plus payload) in one `Bytes`.
//!
//! Server frames are never masked (RFC 6455 §5.1), so one encoded frame is valid for every
//! subscriber. Parsing client frames lives in `reader.rs`, not here.

use bytes::{BufMut, Bytes, BytesMut};

/// The data opcodes a published message can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Text,
    Binary,
}

impl Opcode {
    fn bits(self) -> u8 {
        match self {
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
        }
    }
}

pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// Close codes the server sends (RFC 6455 §7.4 plus our private 4xxx codes).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The connection's expiry (its token's `exp`) has passed.
    pub const TOKEN_EXPIRED: u16 = 4010;
    pub const PONG_TIMEOUT: u16 = 4012;
}

/// Length of the header of an unmasked frame with a `len`-byte payload.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

fn encode_raw(first: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut buf = BytesMut::with_capacity(header_len(len) + len);
    buf.put_u8(first);
    match len {
        0..=125 => buf.put_u8(len as u8),
        126..=65535 => {
            buf.put_u8(126);
            buf.put_u16(len as u16);
        }
        _ => {
            buf.put_u8(127);
            buf.put_u64(len as u64);
        }
    }
    buf.put_slice(payload);
    buf.freeze()
}

/// Encodes a final, unmasked data frame. This is the only place a published payload is copied.
pub fn encode(opcode: Opcode, payload: &[u8]) -> Bytes {
    encode_raw(0x80 | opcode.bits(), payload)
}

/// Encodes a pong that answers a client's ping with the same payload (at most 125 bytes).
pub fn pong(payload: &[u8]) -> Bytes {
    debug_assert!(payload.len() <= 125);
    encode_raw(0x80 | OP_PONG, payload)
}

/// The server's heartbeat ping: empty, identical for every client, never allocated.
pub fn ping() -> Bytes {
    Bytes::from_static(&[0x80 | OP_PING, 0])
}

/// Encodes a close frame. The reason is cut to fit the 125-byte control payload limit.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_raw(0x80 | OP_CLOSE, &payload)
}

/// Appends a masked client frame, as a client sends it (the load generator, tests and
/// benchmarks). Servers never send masked frames; nothing in the relay calls this.
pub fn encode_client(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push((u8::from(fin) << 7) | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// One masked client frame with a fixed mask: for tests, benchmarks and fuzz seeds.
#[doc(hidden)]
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    encode_client(&mut f, fin, opcode, payload, [0x37, 0xfa, 0x21, 0x3d]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::{OpCode, Role, WebSocket};

    /// Decodes `frames` with fastwebsockets acting as a client, as an independent check.
    async fn decode_all(frames: Vec<Bytes>) -> Vec<(OpCode, bool, Vec<u8>)> {
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let (mut client, mut server) = tokio::io::duplex(wire.len() + 1);
        tokio::io::AsyncWriteExt::write_all(&mut server, &wire)
            .await
            .unwrap();
        drop(server);
        let _ = &mut client;
        let mut ws = WebSocket::after_handshake(client, Role::Client);
        ws.set_auto_close(false);
        ws.set_auto_pong(false);
        ws.set_max_message_size(1 << 20);
        let mut out = Vec::new();
        for _ in 0..frames.len() {
            let f = ws
                .read_frame()
                .await
                .expect("fastwebsockets decodes our frame");
            out.push((f.opcode, f.fin, f.payload.to_vec()));
        }
        out
    }

    #[tokio::test]
    async fn boundary_lengths_decode_with_fastwebsockets() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let bin = encode(Opcode::Binary, &payload);
            assert_eq!(bin.len(), header_len(len) + len);
            let text = encode(Opcode::Text, &vec![b'a'; len]);
            let got = decode_all(vec![bin, text]).await;
            assert_eq!(got[0], (OpCode::Binary, true, payload), "binary len {len}");
            assert_eq!(
                got[1],
                (OpCode::Text, true, vec![b'a'; len]),
                "text len {len}"
            );
        }
    }

    #[tokio::test]
    async fn control_frames_decode() {
        let got = decode_all(vec![ping(), pong(b"hi"), close(4008, "slow consumer")]).await;
        assert_eq!(got[0], (OpCode::Ping, true, vec![]));
        assert_eq!(got[1], (OpCode::Pong, true, b"hi".to_vec()));
        assert_eq!(got[2].0, OpCode::Close);
        assert_eq!(&got[2].2[..2], &4008u16.to_be_bytes());
        assert_eq!(&got[2].2[2..], b"slow consumer");
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let long = "é".repeat(100);
        let f = close(1000, &long);
        assert!(f.len() - 2 <= 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }
}
