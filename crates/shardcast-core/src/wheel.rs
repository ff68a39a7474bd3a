//! The timer wheel that drives heartbeats, write timeouts and close deadlines for one shard.
//!
//! Time is counted in ticks. Entries are never cancelled: the owner checks, when an entry fires,
//! whether it still applies (lazy cancellation), so scheduling is a `Vec::push` and nothing
//! needs a handle. No tokio timer exists per connection; the shard drives the wheel from one
//! interval. What the entries mean lives in `shard/timers.rs`, not here.

/// A hashed timing wheel of `T` entries.
///
/// Invariant: an entry with deadline `d` sits in slot `d % slots.len()` and fires on the first
/// `advance` whose target is `>= d`. `now` only grows.
#[derive(Debug)]
pub struct TimerWheel<T> {
    slots: Vec<Vec<(u64, T)>>,
    now: u64,
    len: usize,
}

impl<T> TimerWheel<T> {
    /// A wheel with `slots` slots (rounded up to a power of two), starting at tick 0.
    pub fn new(slots: usize) -> Self {
        let n = slots.max(1).next_power_of_two();
        Self {
            slots: (0..n).map(|_| Vec::new()).collect(),
            now: 0,
            len: 0,
        }
    }

    /// The last tick that has been processed.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Number of entries waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `item` to fire at tick `at`; a deadline in the past fires on the next advance.
    pub fn schedule(&mut self, at: u64, item: T) {
        let at = at.max(self.now.saturating_add(1));
        let mask = self.slots.len() as u64 - 1;
        self.slots[(at & mask) as usize].push((at, item));
        self.len += 1;
    }

    /// Processes every tick up to and including `to`, appending due entries to `fired` in
    /// deadline order per slot visit.
    pub fn advance(&mut self, to: u64, fired: &mut Vec<T>) {
        if to <= self.now {
            return;
        }
        let n = self.slots.len() as u64;
        // Visiting more than one revolution would see every slot twice; one visit of each slot,
        // firing everything due by `to`, is the same result.
        let first = if to - self.now > n {
            to - n + 1
        } else {
            self.now + 1
        };
        let mask = n - 1;
        for tick in first..=to {
            let slot = &mut self.slots[(tick & mask) as usize];
            let before = slot.len();
            fired.extend(
                slot.extract_if(.., |(at, _)| *at <= to)
                    .map(|(_, item)| item),
            );
            self.len -= before - slot.len();
            if slot.is_empty() && slot.capacity() > 64 {
                slot.shrink_to(8);
            }
        }
        self.now = to;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_exactly_when_due() {
        let mut w = TimerWheel::new(8);
        w.schedule(3, "a");
        w.schedule(5, "b");
        w.schedule(5 + 8, "c"); // same slot as b, next revolution
        let mut out = Vec::new();
        w.advance(2, &mut out);
        assert!(out.is_empty());
        w.advance(3, &mut out);
        assert_eq!(out, vec!["a"]);
        out.clear();
        w.advance(12, &mut out);
        assert_eq!(out, vec!["b"]);
        out.clear();
        w.advance(13, &mut out);
        assert_eq!(out, vec!["c"]);
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadlines_fire_on_next_tick() {
        let mut w = TimerWheel::new(4);
        let mut out = Vec::new();
        w.advance(10, &mut out);
        w.schedule(2, 1);
        w.advance(11, &mut out);
        assert_eq!(out, vec![1]);
    }

    #[test]
    fn a_long_jump_fires_everything_once() {
        let mut w = TimerWheel::new(4);
        for t in 1..=20 {
            w.schedule(t, t);
        }
        w.schedule(1000, 1000);
        let mut out = Vec::new();
        w.advance(100, &mut out);
        out.sort();
        assert_eq!(out, (1..=20).collect::<Vec<_>>());
        assert_eq!(w.len(), 1);
        out.clear();
        w.advance(999, &mut out);
        assert!(out.is_empty());
        w.advance(1000, &mut out);
        assert_eq!(out, vec![1000]);
    }
}
