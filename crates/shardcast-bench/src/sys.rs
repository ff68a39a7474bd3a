//! What the load generator reads from the OS: its own CPU time (`getrusage`), another
//! process's CPU time and RSS (`/proc/PID/stat`, `/proc/PID/status`) and the kernel's TCP
//! socket memory (`/proc/net/sockstat`). Reading only; nothing here changes the system.

use std::time::Duration;

/// CPU time of this process (all threads) so far: (user, system).
pub fn self_cpu() -> (Duration, Duration) {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => (tv(u.user_time()), tv(u.system_time())),
        // getrusage(RUSAGE_SELF) cannot fail on Linux; report nothing rather than abort.
        Err(_) => (Duration::ZERO, Duration::ZERO),
    }
}

fn tv(t: nix::sys::time::TimeVal) -> Duration {
    Duration::from_secs(t.tv_sec().max(0) as u64) + Duration::from_micros(t.tv_usec().max(0) as u64)
}

/// Clock ticks per second of `/proc/PID/stat` times (`USER_HZ`, 100 on Linux).
const USER_HZ: u64 = 100;

/// CPU time (user, system) of process `pid`, all threads, from `/proc/PID/stat`.
pub fn process_cpu(pid: u32) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the file, utime 14, stime 15 (1-based).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let tick = |t: u64| Duration::from_millis(t * 1000 / USER_HZ);
    Some((tick(utime), tick(stime)))
}

/// Resident set size of process `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn process_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Memory of all TCP sockets in the kernel, in bytes: the `mem` pages of the `TCP:` line of
/// `/proc/net/sockstat` times the page size. System-wide, both ends of loopback connections.
pub fn tcp_socket_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    tcp_mem_pages(&text).map(|p| p * page_size())
}

/// The kernel's slab memory in bytes (`Slab:` of `/proc/meminfo`): where socket structures
/// live, which `sockstat`'s `mem` (buffered data only) does not count. System-wide.
pub fn kernel_slab() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("Slab:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn tcp_mem_pages(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(word) = it.next() {
        if word == "mem" {
            return it.next()?.parse().ok();
        }
    }
    None
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64)
}

/// Raises the open-file soft limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_mem_is_read_from_the_tcp_line() {
        let text =
            "sockets: used 300\nTCP: inuse 5 orphan 0 tw 2 alloc 9 mem 17\nUDP: inuse 1 mem 3\n";
        assert_eq!(tcp_mem_pages(text), Some(17));
        assert_eq!(tcp_mem_pages("UDP: inuse 1 mem 3\n"), None);
    }

    #[test]
    fn this_process_is_readable() {
        let pid = std::process::id();
        assert!(process_rss(pid).is_some_and(|r| r > 0));
        assert!(process_cpu(pid).is_some());
        assert!(kernel_slab().is_some());
        let _ = self_cpu();
    }
}
