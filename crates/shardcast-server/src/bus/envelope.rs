//! The bus envelope: the versioned binary form of one message (or one stall probe) on the
//! broker, and its defensive decoder. Broker I/O, channel names and delivery live in the rest
//! of `bus/`, not here.
//!
//! Layout, all integers big-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version, [`VERSION`] |
//! | 16 | node id of the publishing process (random per process) |
//! | 1 | kind: 1 text, 2 binary, 3 probe |
//! | 4 | payload length |
//! | n | payload |
//!
//! The decoder checks every length: the header must be complete and the declared payload
//! length must equal the bytes that follow. An unknown version or kind is refused, never
//! guessed at.

use bytes::{BufMut, Bytes, BytesMut};

use crate::Opcode;

/// The only version this build writes and reads.
pub const VERSION: u8 = 1;

/// Bytes before the payload: version, node id, kind, payload length.
pub const HEADER_LEN: usize = 1 + 16 + 1 + 4;

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A message for the topic's subscribers, delivered as a text frame.
    Text,
    /// A message for the topic's subscribers, delivered as a binary frame.
    Binary,
    /// A node's stall probe on its private channel; the payload is its sequence number.
    Probe,
}

impl Kind {
    fn to_byte(self) -> u8 {
        match self {
            Self::Text => 1,
            Self::Binary => 2,
            Self::Probe => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Text),
            2 => Some(Self::Binary),
            3 => Some(Self::Probe),
            _ => None,
        }
    }

    /// The kind of a published message.
    pub fn of(opcode: Opcode) -> Self {
        match opcode {
            Opcode::Text => Self::Text,
            Opcode::Binary => Self::Binary,
        }
    }

    /// The frame opcode of a message kind; `None` for a probe.
    pub fn opcode(self) -> Option<Opcode> {
        match self {
            Self::Text => Some(Opcode::Text),
            Self::Binary => Some(Opcode::Binary),
            Self::Probe => None,
        }
    }
}

/// A decoded envelope, borrowing its payload from the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub node: u128,
    pub kind: Kind,
    pub payload: &'a [u8],
}

/// Why bytes from the broker are not an envelope this build can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bus envelope of {0} bytes is shorter than its {HEADER_LEN}-byte header")]
    Short(usize),
    #[error("unknown bus envelope version {0} (this build reads version {VERSION})")]
    Version(u8),
    #[error("unknown bus message kind {0}")]
    Kind(u8),
    #[error("bus envelope declares {declared} payload bytes but carries {actual}")]
    Length { declared: u32, actual: usize },
}

/// Encodes one envelope. Payloads are bounded by `--max-message-bytes` (far below 4 GiB)
/// before they get here; a longer one is cut to `u32::MAX` bytes.
pub fn encode(node: u128, kind: Kind, payload: &[u8]) -> Bytes {
    let payload = &payload[..payload.len().min(u32::MAX as usize)];
    let mut b = BytesMut::with_capacity(HEADER_LEN + payload.len());
    b.put_u8(VERSION);
    b.put_u128(node);
    b.put_u8(kind.to_byte());
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// Decodes one envelope, checking the version first, then every length.
pub fn decode(bytes: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    let Some(&version) = bytes.first() else {
        return Err(DecodeError::Short(0));
    };
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let Some((header, payload)) = bytes.split_at_checked(HEADER_LEN) else {
        return Err(DecodeError::Short(bytes.len()));
    };
    let mut node = [0u8; 16];
    node.copy_from_slice(&header[1..17]);
    let kind = Kind::from_byte(header[17]).ok_or(DecodeError::Kind(header[17]))?;
    let declared = u32::from_be_bytes([header[18], header[19], header[20], header[21]]);
    if declared as usize != payload.len() {
        return Err(DecodeError::Length {
            declared,
            actual: payload.len(),
        });
    }
    Ok(Envelope {
        node: u128::from_be_bytes(node),
        kind,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for (kind, payload) in [
            (Kind::Text, &b"hello"[..]),
            (Kind::Binary, &[0u8, 255, 1][..]),
            (Kind::Probe, &7u64.to_be_bytes()[..]),
            (Kind::Text, &[][..]),
        ] {
            let bytes = encode(u128::MAX - 3, kind, payload);
            assert_eq!(bytes.len(), HEADER_LEN + payload.len());
            let e = decode(&bytes).unwrap();
            assert_eq!(
                e,
                Envelope {
                    node: u128::MAX - 3,
                    kind,
                    payload
                }
            );
        }
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let good = encode(1, Kind::Text, b"abc");
        assert_eq!(decode(&[]), Err(DecodeError::Short(0)));
        assert_eq!(decode(&good[..5]), Err(DecodeError::Short(5)));
        let mut v2 = good.to_vec();
        v2[0] = 2;
        assert_eq!(decode(&v2), Err(DecodeError::Version(2)));
        let mut bad_kind = good.to_vec();
        bad_kind[17] = 9;
        assert_eq!(decode(&bad_kind), Err(DecodeError::Kind(9)));
        assert_eq!(
            decode(&good[..good.len() - 1]),
            Err(DecodeError::Length {
                declared: 3,
                actual: 2
            })
        );
        let mut longer = good.to_vec();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(DecodeError::Length { .. })));
    }
}
