//! Client-to-server frame decoding: a push parser that owns no read buffer.
//!
//! Bytes are fed in whatever pieces the socket returns; complete messages and control frames
//! come out as [`Event`]s. Between messages the parser holds a few dozen bytes of state and no
//! heap memory, which is why an idle connection stays cheap. fastwebsockets' reader (we keep
//! fastwebsockets for the upgrade) holds an 8 KiB buffer per connection, bounds each frame but
//! not the sum of a fragmented message, and accepts unmasked client frames;
//! `docs/ARCHITECTURE.md` ("Why our own reader") has the benchmark figures. Socket I/O lives
//! in `conn.rs`, not here.
//!
//! Every RFC 6455 violation becomes a [`ProtocolError`] carrying the close code to send.

use crate::frame::{OP_CLOSE, OP_PING, OP_PONG, Opcode, close_code};

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;

/// What a client sent, reassembled and unmasked.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete data message. Text payloads are valid UTF-8.
    Message {
        opcode: Opcode,
        payload: Vec<u8>,
    },
    Ping(Vec<u8>),
    Pong,
    /// The client's close frame. `code` is `None` for an empty close payload.
    Close {
        code: Option<u16>,
    },
}

/// A violation of RFC 6455 and the close code that answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {code})")]
pub struct ProtocolError {
    pub code: u16,
    pub reason: &'static str,
}

const fn violation(reason: &'static str) -> ProtocolError {
    ProtocolError {
        code: close_code::PROTOCOL_ERROR,
        reason,
    }
}

#[derive(Debug)]
enum State {
    /// Collecting the 2 to 14 header bytes into `hdr`.
    Header,
    /// Copying `remaining` payload bytes of the current frame.
    Payload { remaining: usize },
    /// A close frame was parsed or an error returned: all further input is ignored.
    Done,
}

/// Incremental RFC 6455 server-side frame parser.
///
/// Invariants: `msg` is non-empty only while a data message is in progress
/// (`msg_opcode.is_some()`), and `msg.len()` never exceeds `max_message`. `ctrl` is allocated
/// only while a control frame's payload is being read. For a text message,
/// `msg.len() - utf8_checked` is at most 3: the start of a character still incomplete.
#[derive(Debug)]
pub struct FrameReader {
    max_message: usize,
    state: State,
    hdr: [u8; 14],
    hdr_len: u8,
    /// Header of the frame being read: opcode, fin, mask, and how far into the mask we are.
    opcode: u8,
    fin: bool,
    mask: [u8; 4],
    mask_pos: usize,
    /// Opcode of the fragmented data message in progress, if any.
    msg_opcode: Option<Opcode>,
    msg: Vec<u8>,
    /// Length of the prefix of a text `msg` known to be valid UTF-8 and to end on a character
    /// boundary. Each piece of payload is checked as it is fed, so bad text fails at the feed
    /// that brings it, even mid-frame. The bytes after it (at most 3, a character not complete
    /// yet) are the partial code point carried to the next feed; they stay in `msg`, so the
    /// carry costs no field and each byte is validated once, plus at most 3 bytes per feed.
    utf8_checked: usize,
    ctrl: Vec<u8>,
}

impl FrameReader {
    /// A parser that refuses messages larger than `max_message` bytes (after reassembly).
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            state: State::Header,
            hdr: [0; 14],
            hdr_len: 0,
            opcode: 0,
            fin: false,
            mask: [0; 4],
            mask_pos: 0,
            msg_opcode: None,
            msg: Vec::new(),
            utf8_checked: 0,
            ctrl: Vec::new(),
        }
    }

    /// Bytes allocated for the message and the control frame in progress. Never more than
    /// the message limit plus 125 (the largest control payload).
    pub fn buffered(&self) -> usize {
        self.msg.capacity() + self.ctrl.capacity()
    }

    /// True once a close frame was parsed or a protocol error returned.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Feeds `input`, appending every completed event to `out`.
    ///
    /// Returns an error at the first violation; events before it are already in `out`. After a
    /// close frame or an error the parser ignores further input.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<Event>) -> Result<(), ProtocolError> {
        while !input.is_empty() {
            match self.state {
                State::Done => return Ok(()),
                State::Header => {
                    let need = self.header_needed();
                    let have = self.hdr_len as usize;
                    let take = (need - have).min(input.len());
                    self.hdr[have..have + take].copy_from_slice(&input[..take]);
                    self.hdr_len += take as u8;
                    input = &input[take..];
                    // The needed length can grow once the length byte is known.
                    if self.hdr_len as usize == self.header_needed()
                        && let Err(e) = self.start_frame(out)
                    {
                        self.state = State::Done;
                        return Err(e);
                    }
                }
                State::Payload { remaining } => {
                    let take = remaining.min(input.len());
                    let (chunk, rest) = input.split_at(take);
                    input = rest;
                    let control = is_control(self.opcode);
                    let dst = if control {
                        &mut self.ctrl
                    } else {
                        &mut self.msg
                    };
                    let start = dst.len();
                    dst.extend_from_slice(chunk);
                    unmask(&mut dst[start..], self.mask, self.mask_pos);
                    self.mask_pos = (self.mask_pos + take) % 4;
                    if !control
                        && self.msg_opcode == Some(Opcode::Text)
                        && let Err(e) = self.check_utf8()
                    {
                        self.state = State::Done;
                        return Err(e);
                    }
                    if take == remaining {
                        if let Err(e) = self.end_frame(out) {
                            self.state = State::Done;
                            return Err(e);
                        }
                    } else {
                        self.state = State::Payload {
                            remaining: remaining - take,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// Header bytes needed given what has been read so far (2 until the length byte is known).
    fn header_needed(&self) -> usize {
        if self.hdr_len < 2 {
            return 2;
        }
        let ext = match self.hdr[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.hdr[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    /// Validates a complete header and sets up payload reading.
    fn start_frame(&mut self, out: &mut Vec<Event>) -> Result<(), ProtocolError> {
        let b0 = self.hdr[0];
        let b1 = self.hdr[1];
        if b0 & 0x70 != 0 {
            return Err(violation("reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            return Err(violation("client frame not masked"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        let (len, mask_at) = match b1 & 0x7F {
            126 => (u16::from_be_bytes([self.hdr[2], self.hdr[3]]) as u64, 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.hdr[2..10]);
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(violation("64-bit length has its top bit set"));
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        self.mask.copy_from_slice(&self.hdr[mask_at..mask_at + 4]);
        self.mask_pos = 0;
        self.hdr_len = 0;

        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return Err(violation("fragmented control frame"));
                }
                if len > 125 {
                    return Err(violation("control frame payload over 125 bytes"));
                }
            }
            OP_CONT => {
                if self.msg_opcode.is_none() {
                    return Err(violation("continuation frame with no message started"));
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.msg_opcode.is_some() {
                    return Err(violation("new data frame inside a fragmented message"));
                }
                self.msg_opcode = Some(if opcode == OP_TEXT {
                    Opcode::Text
                } else {
                    Opcode::Binary
                });
            }
            _ => return Err(violation("unknown opcode")),
        }
        if !is_control(opcode)
            && (self.msg.len() as u64).saturating_add(len) > self.max_message as u64
        {
            return Err(ProtocolError {
                code: close_code::TOO_BIG,
                reason: "message too big",
            });
        }
        self.opcode = opcode;
        self.fin = fin;
        // `len` is at most max_message (data) or 125 (control) here, so it fits in usize and
        // reserving it is bounded.
        let len = len as usize;
        if is_control(opcode) {
            self.ctrl.reserve_exact(len);
        } else {
            // Grow geometrically, but never past the limit: a message that ends at the limit
            // after many fragments must not leave a buffer up to twice as large.
            let needed = self.msg.len() + len;
            if needed > self.msg.capacity() {
                let target = needed
                    .max(self.msg.capacity().saturating_mul(2))
                    .min(self.max_message);
                self.msg.reserve_exact(target - self.msg.len());
            }
        }
        if len == 0 {
            self.end_frame(out)
        } else {
            self.state = State::Payload { remaining: len };
            Ok(())
        }
    }

    /// Handles a frame whose payload is complete.
    fn end_frame(&mut self, out: &mut Vec<Event>) -> Result<(), ProtocolError> {
        self.state = State::Header;
        match self.opcode {
            OP_PING => out.push(Event::Ping(std::mem::take(&mut self.ctrl))),
            OP_PONG => {
                self.ctrl = Vec::new();
                out.push(Event::Pong);
            }
            OP_CLOSE => {
                let payload = std::mem::take(&mut self.ctrl);
                self.state = State::Done;
                let code = match payload.len() {
                    0 => None,
                    1 => return Err(violation("close payload of 1 byte")),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !valid_close_code(code) {
                            return Err(violation("invalid close code"));
                        }
                        if simdutf8::basic::from_utf8(&payload[2..]).is_err() {
                            return Err(violation("close reason is not valid utf-8"));
                        }
                        Some(code)
                    }
                };
                out.push(Event::Close { code });
            }
            _ if self.fin => {
                // msg_opcode is always set while a data frame is being read (start_frame).
                let opcode = self.msg_opcode.take().unwrap_or(Opcode::Binary);
                let payload = std::mem::take(&mut self.msg);
                let checked = std::mem::take(&mut self.utf8_checked);
                // Every byte was checked as it arrived; what is left unchecked is a character
                // the message ends inside.
                if opcode == Opcode::Text && checked != payload.len() {
                    return Err(not_utf8());
                }
                out.push(Event::Message { opcode, payload });
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks the text bytes appended to `msg` since the last check, starting with the partial
    /// character carried from before. Fails at once on bytes that can never be valid UTF-8; a
    /// character merely incomplete at the end is kept unchecked for the next feed.
    fn check_utf8(&mut self) -> Result<(), ProtocolError> {
        match simdutf8::compat::from_utf8(&self.msg[self.utf8_checked..]) {
            Ok(_) => self.utf8_checked = self.msg.len(),
            // `error_len() == None`: the input ends inside a character that may still be valid.
            Err(e) if e.error_len().is_none() => self.utf8_checked += e.valid_up_to(),
            Err(_) => return Err(not_utf8()),
        }
        debug_assert!(self.msg.len() - self.utf8_checked <= 3);
        Ok(())
    }
}

fn not_utf8() -> ProtocolError {
    ProtocolError {
        code: close_code::INVALID_DATA,
        reason: "text message is not valid utf-8",
    }
}

fn is_control(opcode: u8) -> bool {
    opcode & 0x8 != 0
}

/// Close codes a client may send (RFC 6455 §7.4 and the IANA registry).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `buf` with `mask`, where `buf[0]` sits at position `offset` of the frame payload.
fn unmask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut rotated = mask;
    rotated.rotate_left(offset % 4);
    fastwebsockets::unmask(buf, rotated);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::frame::client_frame;

    fn feed_all(max: usize, wire: &[u8], piece: usize) -> (Vec<Event>, Result<(), ProtocolError>) {
        let mut r = FrameReader::new(max);
        let mut out = Vec::new();
        for chunk in wire.chunks(piece.max(1)) {
            if let Err(e) = r.feed(chunk, &mut out) {
                return (out, Err(e));
            }
        }
        (out, Ok(()))
    }

    #[test]
    fn messages_of_every_length_class_in_any_split() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let wire = client_frame(true, OP_BINARY, &payload);
            for piece in [1, 3, 7, 4096, wire.len()] {
                if len > 1000 && piece < 1000 {
                    continue;
                }
                let (ev, res) = feed_all(1 << 20, &wire, piece);
                assert_eq!(res, Ok(()));
                assert_eq!(
                    ev,
                    vec![Event::Message {
                        opcode: Opcode::Binary,
                        payload: payload.clone()
                    }]
                );
            }
        }
    }

    #[test]
    fn fragments_reassemble_with_interleaved_control() {
        let mut wire = client_frame(false, OP_TEXT, "héllo ".as_bytes());
        wire.extend(client_frame(true, OP_PING, b"p"));
        wire.extend(client_frame(false, OP_CONT, b"wor"));
        wire.extend(client_frame(true, OP_CONT, b"ld"));
        wire.extend(client_frame(true, OP_PONG, b""));
        for piece in [1, 2, 5, wire.len()] {
            let (ev, res) = feed_all(1024, &wire, piece);
            assert_eq!(res, Ok(()));
            assert_eq!(
                ev,
                vec![
                    Event::Ping(b"p".to_vec()),
                    Event::Message {
                        opcode: Opcode::Text,
                        payload: "héllo world".as_bytes().to_vec()
                    },
                    Event::Pong,
                ]
            );
        }
    }

    #[test]
    fn utf8_split_across_fragments_is_valid() {
        let s = "€".as_bytes();
        let mut wire = client_frame(false, OP_TEXT, &s[..1]);
        wire.extend(client_frame(true, OP_CONT, &s[1..]));
        let (ev, res) = feed_all(1024, &wire, 1);
        assert_eq!(res, Ok(()));
        assert_eq!(ev.len(), 1);
    }

    #[test]
    fn invalid_text_fails_in_the_chop_that_brings_it_before_the_frame_ends() {
        let mut payload = "valid start ".repeat(100).into_bytes();
        payload.truncate(1000);
        // Each case: bytes at 150.., where the second chop stops. From the third on, the chop
        // ends inside what would be a character, but no later byte could make it valid.
        for bad in [
            &[0xFF][..],
            &[0xC3, 0x28],
            &[0xE0, 0x80],
            &[0xED, 0xA0],
            &[0xF4, 0x90],
            &[0xC0],
            &[0xF5],
        ] {
            let mut p = payload.clone();
            p[150..150 + bad.len()].copy_from_slice(bad);
            let wire = client_frame(true, OP_TEXT, &p);
            let header = wire.len() - p.len();
            let mut r = FrameReader::new(1 << 20);
            let mut out = Vec::new();
            r.feed(&wire[..header + 100], &mut out)
                .expect("the first chop is valid text");
            let err = r
                .feed(&wire[header + 100..header + 150 + bad.len()], &mut out)
                .expect_err("the second chop must fail before the frame ends");
            assert_eq!(err, not_utf8(), "{bad:x?}");
            assert!(r.is_done() && out.is_empty());
        }
    }

    #[test]
    fn code_point_split_across_chops_and_fragments_is_accepted() {
        let text = "a€😀é中".as_bytes();
        // Two fragments split at every byte, each fragment fed in chops of every small size,
        // so every character is split across fragments and across chops, with a ping between.
        for at in 0..=text.len() {
            let mut wire = client_frame(false, OP_TEXT, &text[..at]);
            wire.extend(client_frame(true, OP_PING, b""));
            wire.extend(client_frame(true, OP_CONT, &text[at..]));
            for piece in 1..=5 {
                let (ev, res) = feed_all(1024, &wire, piece);
                assert_eq!(res, Ok(()), "split at {at}, chops of {piece}");
                assert_eq!(
                    ev,
                    vec![
                        Event::Ping(Vec::new()),
                        Event::Message {
                            opcode: Opcode::Text,
                            payload: text.to_vec()
                        }
                    ],
                    "split at {at}, chops of {piece}"
                );
            }
        }
    }

    #[test]
    fn message_ending_inside_a_character_is_refused_at_its_end() {
        let euro = "€".as_bytes();
        let one_frame = client_frame(true, OP_TEXT, &[b'a', euro[0], euro[1]]);
        let final_fragment = fragmented(&[b"a", &euro[..2]]);
        let empty_final = fragmented(&[&euro[..1], b""]);
        for wire in [one_frame, final_fragment, empty_final] {
            for piece in [1, 2, wire.len()] {
                let (ev, res) = feed_all(1024, &wire, piece);
                assert_eq!(res, Err(not_utf8()), "{wire:x?} in chops of {piece}");
                assert!(ev.is_empty());
            }
        }
        // Until the final fragment, an incomplete character is not an error.
        let mut r = FrameReader::new(1024);
        r.feed(&client_frame(false, OP_TEXT, &euro[..2]), &mut Vec::new())
            .expect("the message may still complete the character");
    }

    #[test]
    fn large_text_in_one_byte_chops_is_accepted() {
        // 1 MiB fed a byte at a time: re-validating the message on each feed would take
        // about 2^39 byte checks and never finish.
        let max = 1 << 20;
        let unit = "ascii, é, €, 😀; ";
        let mut text = unit.repeat(max / unit.len()).into_bytes();
        text.extend(std::iter::repeat_n(b'.', max - text.len()));
        // Two fragments, split inside a character.
        let at = (max / 2..)
            .find(|&i| text[i] & 0xC0 == 0x80)
            .expect("a continuation byte");
        let wire = fragmented(&[&text[..at], &text[at..]]);
        let (ev, res) = feed_all(max, &wire, 1);
        assert_eq!(res, Ok(()));
        assert!(
            matches!(&ev[..], [Event::Message { opcode: Opcode::Text, payload }] if *payload == text)
        );
    }

    /// A text message sent as one fragment per part.
    fn fragmented(parts: &[&[u8]]) -> Vec<u8> {
        let last = parts.len() - 1;
        parts
            .iter()
            .enumerate()
            .flat_map(|(i, p)| client_frame(i == last, if i == 0 { OP_TEXT } else { OP_CONT }, p))
            .collect()
    }

    fn code_of(wire: &[u8], max: usize) -> u16 {
        feed_all(max, wire, wire.len())
            .1
            .expect_err("must be refused")
            .code
    }

    #[test]
    fn invalid_text_fails_at_the_fragment_that_breaks_it() {
        let mut r = FrameReader::new(1 << 20);
        let mut out = Vec::new();
        // "€" split across fragments is fine so far.
        r.feed(&client_frame(false, OP_TEXT, b"ok \xE2\x82"), &mut out)
            .expect("an incomplete character is not an error yet");
        let err = r
            .feed(&client_frame(false, OP_CONT, b"\xAC and \xFF"), &mut out)
            .expect_err("an invalid byte must fail before the message ends");
        assert_eq!(err.code, 1007);
        assert!(out.is_empty());
    }

    #[test]
    fn violations_get_their_close_codes() {
        let mut unmasked = client_frame(true, OP_TEXT, b"hi");
        unmasked[1] &= 0x7F;
        unmasked.truncate(2);
        assert_eq!(code_of(&unmasked, 100), 1002);
        for rsv in [0x40, 0x20, 0x10] {
            let mut f = client_frame(true, OP_TEXT, b"hi");
            f[0] |= rsv;
            assert_eq!(code_of(&f, 100), 1002);
        }
        for op in [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(
                code_of(&client_frame(true, op, b""), 100),
                1002,
                "opcode {op}"
            );
        }
        assert_eq!(code_of(&client_frame(false, OP_PING, b""), 100), 1002);
        assert_eq!(code_of(&client_frame(true, OP_PING, &[0; 126]), 1000), 1002);
        assert_eq!(code_of(&client_frame(true, OP_CONT, b"x"), 100), 1002);
        let mut nested = client_frame(false, OP_TEXT, b"a");
        nested.extend(client_frame(true, OP_TEXT, b"b"));
        assert_eq!(code_of(&nested, 100), 1002);
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(code_of(&huge, 100), 1002);
        assert_eq!(
            code_of(&client_frame(true, OP_TEXT, &[0xff, 0xfe]), 100),
            1007
        );
        let mut split_bad = client_frame(false, OP_TEXT, &[0xe2, 0x82]);
        split_bad.extend(client_frame(true, OP_CONT, &[0x28]));
        assert_eq!(code_of(&split_bad, 100), 1007);
        assert_eq!(code_of(&client_frame(true, OP_CLOSE, &[3]), 100), 1002);
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            let f = client_frame(true, OP_CLOSE, &bad.to_be_bytes());
            assert_eq!(code_of(&f, 100), 1002, "close code {bad}");
        }
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.push(0xff);
        assert_eq!(
            code_of(&client_frame(true, OP_CLOSE, &bad_reason), 100),
            1002
        );
    }

    #[test]
    fn size_limit_is_exact_and_counts_fragments() {
        let (ev, res) = feed_all(10, &client_frame(true, OP_BINARY, &[1; 10]), 64);
        assert_eq!(res, Ok(()));
        assert_eq!(ev.len(), 1);
        assert_eq!(code_of(&client_frame(true, OP_BINARY, &[1; 11]), 10), 1009);
        let mut wire = Vec::new();
        for _ in 0..10 {
            wire.extend(client_frame(
                false,
                if wire.is_empty() { OP_BINARY } else { OP_CONT },
                &[1],
            ));
        }
        wire.extend(client_frame(true, OP_CONT, &[1]));
        assert_eq!(code_of(&wire, 10), 1009);
        // A declared length over the limit is refused before any payload is buffered.
        let mut r = FrameReader::new(10);
        let mut hdr = vec![0x82, 0xFF];
        hdr.extend_from_slice(&(1u64 << 40).to_be_bytes());
        hdr.extend_from_slice(&[0; 4]);
        assert_eq!(r.feed(&hdr, &mut Vec::new()).unwrap_err().code, 1009);
        assert_eq!(r.msg.capacity(), 0);
        // Many small fragments up to the limit never allocate past it.
        let max = 1000;
        let mut r = FrameReader::new(max);
        let mut out = Vec::new();
        r.feed(&client_frame(false, OP_BINARY, &[7; 3]), &mut out)
            .expect("first fragment");
        for _ in 0..(max - 3) / 3 {
            r.feed(&client_frame(false, OP_CONT, &[7; 3]), &mut out)
                .expect("fragment");
            assert!(r.buffered() <= max, "{} buffered", r.buffered());
        }
        r.feed(&client_frame(true, OP_CONT, &[7; 1]), &mut out)
            .expect("last fragment");
        assert!(matches!(&out[..], [Event::Message { payload, .. }] if payload.len() == max));
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn close_ends_parsing_and_later_frames_are_ignored() {
        let mut wire = client_frame(true, OP_CLOSE, &1000u16.to_be_bytes());
        wire.extend(client_frame(true, OP_TEXT, b"ignored"));
        let (ev, res) = feed_all(100, &wire, 3);
        assert_eq!(res, Ok(()));
        assert_eq!(ev, vec![Event::Close { code: Some(1000) }]);
        let (ev, _) = feed_all(100, &client_frame(true, OP_CLOSE, b""), 1);
        assert_eq!(ev, vec![Event::Close { code: None }]);
    }

    #[test]
    fn idle_parser_holds_no_heap_memory() {
        let mut r = FrameReader::new(1 << 16);
        let mut out = Vec::new();
        r.feed(&client_frame(true, OP_BINARY, &[9; 5000]), &mut out)
            .unwrap();
        r.feed(&client_frame(true, OP_PING, b"abc"), &mut out)
            .unwrap();
        assert_eq!((r.msg.capacity(), r.ctrl.capacity()), (0, 0));
        assert!(std::mem::size_of::<FrameReader>() <= 128);
    }
}
