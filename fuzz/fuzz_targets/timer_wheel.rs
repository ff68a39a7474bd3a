//! Drives `shardcast_core::TimerWheel` with arbitrary insert, touch, remove and advance operations
//! and checks it against a `BTreeMap` model of deadlines, with lazy cancellation as the shard
//! does it: an entry is `(key, id)` and applies only while `id` is still the key's current one.
//!
//! Invariants checked after every operation:
//! - `now()` only grows, and equals the target of the last forward `advance`;
//! - `len()` is the number of entries, live and stale, still scheduled;
//! - an `advance` fires exactly the scheduled entries with deadline `<= now`: none early, none
//!   twice, none lost, live or stale;
//! - the live entries it fires are exactly the model's live deadlines `<= now`.
//!
//! The last step advances past every deadline; the wheel must then be empty.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shardcast_core::TimerWheel;

/// Keys the ops pick from, like a shard's client slab keys: few, so that ops collide.
const KEYS: u8 = 16;

#[derive(Arbitrary, Debug)]
struct Input {
    /// The slot count asked for; `new` rounds it up to a power of two (0 gives 1).
    slots: u8,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A client takes `key` with a first deadline; one already holding it is gone.
    Insert { key: u8, delay: Delay },
    /// The client at `key`, if any, gets a new deadline; its old entry becomes stale.
    Touch { key: u8, delay: Delay },
    /// The client at `key`, if any, leaves; its entry becomes stale.
    Remove { key: u8 },
    /// Time moves forward.
    Advance(Step),
    /// `advance` to a tick already processed: nothing fires, `now` stays.
    Rewind(u16),
}

/// A deadline relative to `now`.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Delay {
    /// `now - n`, saturating: in the past, so due on the next tick.
    Past(u8),
    /// `now + n`, `now` itself included.
    Near(u8),
    /// Many revolutions of a small wheel ahead.
    Far(u16),
    Huge(u32),
}

/// How far an `advance` goes past `now`.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Step {
    Tick,
    Small(u8),
    /// `n` whole revolutions of the wheel plus `extra` ticks.
    Revolutions {
        n: u8,
        extra: u8,
    },
    Huge(u32),
}

/// The lazily cancelled entries the wheel holds: which key, which of its generations.
type Entry = (u8, u64);

/// What the wheel should hold.
#[derive(Default)]
struct Model {
    /// The live entry of each key: `(id, deadline)`.
    live: BTreeMap<u8, (u64, u64)>,
    /// Every entry still scheduled, live or stale: `(deadline, id) -> key`.
    pending: BTreeMap<(u64, u64), u8>,
    next_id: u64,
}

struct Harness {
    wheel: TimerWheel<Entry>,
    slots: u64,
    model: Model,
    fired: Vec<Entry>,
}

impl Harness {
    /// Schedules a new generation for `key`; the key's previous entry, if any, becomes stale.
    fn schedule(&mut self, key: u8, delay: Delay) {
        let now = self.wheel.now();
        let at = match delay {
            Delay::Past(n) => now.saturating_sub(u64::from(n)),
            Delay::Near(n) => now + u64::from(n),
            Delay::Far(n) => now + u64::from(n),
            Delay::Huge(n) => now + u64::from(n),
        };
        let deadline = at.max(now + 1);
        let id = self.model.next_id;
        self.model.next_id += 1;
        self.wheel.schedule(at, (key, id));
        self.model.pending.insert((deadline, id), key);
        self.model.live.insert(key, (id, deadline));
    }

    fn advance(&mut self, to: u64) {
        let before = self.wheel.now();
        self.fired.clear();
        self.wheel.advance(to, &mut self.fired);
        let now = self.wheel.now();
        assert_eq!(now, before.max(to), "now after advance({to}) from {before}");

        // Everything scheduled with a deadline <= now, and only that, must have fired.
        let later = self.model.pending.split_off(&(now + 1, 0));
        let due = std::mem::replace(&mut self.model.pending, later);
        let mut due: BTreeMap<u64, (u64, u8)> = due
            .into_iter()
            .map(|((deadline, id), key)| (id, (deadline, key)))
            .collect();
        let mut live_fired = BTreeSet::new();
        for &(key, id) in &self.fired {
            let Some((deadline, k)) = due.remove(&id) else {
                let early = self.model.pending.keys().find(|k| k.1 == id);
                match early {
                    Some(&(deadline, _)) => {
                        panic!("entry {id} due at {deadline} fired early, at {now}")
                    }
                    None => panic!("entry {id} fired twice, or was never scheduled"),
                }
            };
            assert_eq!(k, key, "entry {id} came back with another key");
            assert!(
                deadline <= now,
                "entry {id} due at {deadline} fired at {now}"
            );
            // The owner's generation check: only the key's current entry applies.
            if self
                .model
                .live
                .get(&key)
                .is_some_and(|&(live, _)| live == id)
            {
                assert!(live_fired.insert(key), "key {key} fired twice live");
            }
        }
        assert!(
            due.is_empty(),
            "entries lost at {now} (id -> (deadline, key)): {due:?}"
        );

        let live_due: BTreeSet<u8> = self
            .model
            .live
            .iter()
            .filter(|(_, live)| live.1 <= now)
            .map(|(key, _)| *key)
            .collect();
        assert_eq!(live_fired, live_due, "live entries fired at {now}");
        // A live entry that fired has done its work; its key is free again.
        for key in live_due {
            self.model.live.remove(&key);
        }
    }

    fn check_len(&self) {
        assert_eq!(self.wheel.len(), self.model.pending.len(), "len()");
        assert_eq!(self.wheel.is_empty(), self.model.pending.is_empty());
    }
}

fuzz_target!(|input: Input| {
    let mut h = Harness {
        wheel: TimerWheel::new(usize::from(input.slots)),
        slots: u64::from(input.slots.max(1)).next_power_of_two(),
        model: Model::default(),
        fired: Vec::new(),
    };
    assert_eq!(h.wheel.now(), 0);
    h.check_len();
    // At most one op per input byte and 2^32 ticks per op: time stays far below u64::MAX.
    for op in input.ops {
        match op {
            Op::Insert { key, delay } => h.schedule(key % KEYS, delay),
            Op::Touch { key, delay } => {
                if h.model.live.contains_key(&(key % KEYS)) {
                    h.schedule(key % KEYS, delay);
                }
            }
            Op::Remove { key } => {
                h.model.live.remove(&(key % KEYS));
            }
            Op::Advance(step) => {
                let by = match step {
                    Step::Tick => 1,
                    Step::Small(n) => u64::from(n),
                    Step::Revolutions { n, extra } => u64::from(n) * h.slots + u64::from(extra),
                    Step::Huge(n) => u64::from(n),
                };
                h.advance(h.wheel.now() + by);
            }
            Op::Rewind(back) => {
                let now = h.wheel.now();
                h.advance(now.saturating_sub(u64::from(back)));
                assert!(h.fired.is_empty(), "advance to the past fired entries");
            }
        }
        h.check_len();
    }
    // Past the last deadline, nothing may be left.
    if let Some(&(last, _)) = h.model.pending.keys().next_back() {
        h.advance(last);
    }
    h.check_len();
    assert!(h.wheel.is_empty(), "entries left after the last deadline");
});
