//! What the kernel says of this process (open descriptors, their limit, resident memory),
//! read from `/proc/self` when a scrape asks. Rendering it lives in `metrics.rs`.

/// What the kernel says of this process, read from `/proc/self` at scrape time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    /// Descriptors open now.
    pub open_fds: u64,
    /// The soft limit on open descriptors.
    pub max_fds: u64,
    /// Resident memory, in bytes.
    pub resident_bytes: u64,
}

impl Process {
    /// `None` where `/proc` is not mounted or reads as something else.
    pub fn read() -> Option<Self> {
        // The listing's own descriptor is in it: leave it out.
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .checked_sub(1)? as u64;
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let max_fds = field(&limits, "Max open files", 0)?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let resident_bytes = field(&status, "VmRSS:", 0)? * 1024;
        Some(Self {
            open_fds,
            max_fds,
            resident_bytes,
        })
    }
}

/// The `n`th number after `label` on the line that starts with it.
fn field(text: &str, label: &str, n: usize) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(label))?;
    line[label.len()..].split_whitespace().nth(n)?.parse().ok()
}
