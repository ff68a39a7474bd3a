//! The duration and size syntax every setting shares (`250ms`, `20s`, `64KiB`, `1MiB`), for
//! the server's settings and the load generator's flags alike. No setting lives here.

use std::time::Duration;

/// Parses `250ms`, `20s`, `1m` and the other forms `humantime` accepts.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} (try 250ms, 20s or 1m): {e}"))
}

/// Parses plain bytes (`65536`) or sizes with a unit (`64KiB`, `1MiB`).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|e| format!("invalid size {s:?} (try 65536, 64KiB or 1MiB): {e}"))?;
    usize::try_from(size.as_u64()).map_err(|_| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("lots").is_err());
    }
}
