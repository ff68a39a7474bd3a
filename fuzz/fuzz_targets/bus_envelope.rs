//! The bus envelope decoder on arbitrary bytes from the broker: it never panics, and what it
//! accepts re-encodes to the same bytes. Then encode → decode round-trips an envelope built
//! from the input.
//!
//! Input layout for the round trip: byte 0 picks the kind, bytes 1 to 16 are the node id,
//! the rest is the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast_server::bus::envelope::{Envelope, HEADER_LEN, Kind, decode, encode};

fuzz_target!(|data: &[u8]| {
    // Decoding arbitrary bytes: an error, or an envelope that is exactly these bytes.
    if let Ok(e) = decode(data) {
        assert_eq!(data.len(), HEADER_LEN + e.payload.len());
        assert_eq!(&encode(e.node, e.kind, e.payload)[..], data);
    }

    // Round trip.
    let [k, rest @ ..] = data else {
        return;
    };
    let Some((node, payload)) = rest.split_first_chunk::<16>() else {
        return;
    };
    let kind = match k % 3 {
        0 => Kind::Text,
        1 => Kind::Binary,
        _ => Kind::Probe,
    };
    let node = u128::from_be_bytes(*node);
    let bytes = encode(node, kind, payload);
    assert_eq!(
        decode(&bytes),
        Ok(Envelope {
            node,
            kind,
            payload
        })
    );
});
