//! The stamp every bench payload carries at fixed offsets, and the clock it is read with.
//! Receivers parse only these 20 bytes; the rest of a payload is filler.
//!
//! Layout (little endian): bytes 0..8 send time (ns of `CLOCK_MONOTONIC`, the same clock in
//! every process on the machine), 8..16 sequence number (fanout) or round (chat), 16..20
//! publisher or client id.

/// Bytes of the stamp; the smallest payload a bench sends.
pub const STAMP_LEN: usize = 20;

/// Nanoseconds of `CLOCK_MONOTONIC`. Comparable across the worker processes.
pub fn now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(ts.tv_nsec() as u64),
        // CLOCK_MONOTONIC cannot fail on Linux; a zero stamp would only skew one latency.
        Err(_) => 0,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub sent_ns: u64,
    pub seq: u64,
    pub id: u32,
}

impl Stamp {
    /// Writes the stamp into the first [`STAMP_LEN`] bytes of `payload` (which must be at
    /// least that long; shorter payloads get a truncated stamp).
    pub fn write(&self, payload: &mut [u8]) {
        let mut s = [0u8; STAMP_LEN];
        s[0..8].copy_from_slice(&self.sent_ns.to_le_bytes());
        s[8..16].copy_from_slice(&self.seq.to_le_bytes());
        s[16..20].copy_from_slice(&self.id.to_le_bytes());
        let n = payload.len().min(STAMP_LEN);
        payload[..n].copy_from_slice(&s[..n]);
    }

    /// Reads a stamp, or `None` if the payload is too short to hold one.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let s = payload.get(..STAMP_LEN)?;
        let sent_ns = u64::from_le_bytes(s[0..8].try_into().ok()?);
        let seq = u64::from_le_bytes(s[8..16].try_into().ok()?);
        let id = u32::from_le_bytes(s[16..20].try_into().ok()?);
        Some(Stamp { sent_ns, seq, id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_short_payloads_have_none() {
        let st = Stamp {
            sent_ns: 123_456_789,
            seq: 42,
            id: 7,
        };
        let mut p = vec![0xAAu8; 64];
        st.write(&mut p);
        assert_eq!(Stamp::read(&p), Some(st));
        assert_eq!(p[STAMP_LEN], 0xAA);
        assert_eq!(Stamp::read(&p[..19]), None);
    }

    #[test]
    fn the_clock_moves_forward() {
        let a = now_ns();
        let b = now_ns();
        assert!(a > 0 && b >= a);
    }
}
