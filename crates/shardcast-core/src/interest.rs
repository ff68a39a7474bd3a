//! Which shards have subscribers of which topics on this node ([`Interest`]), and the
//! watcher told when a topic's entry appears or goes (the server's bus). The shards write it
//! (`shard/`), the engine's publish reads it (`engine.rs`); neither lives here.

use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::Topic;
use crate::config::MAX_SHARDS;

/// A set of shard indexes, one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ShardSet([u64; MAX_SHARDS / 64]);

impl ShardSet {
    pub(crate) fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    pub(crate) fn remove(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    /// The set shards in increasing order, visiting only set bits.
    pub(crate) fn iter(self) -> impl Iterator<Item = usize> {
        self.0.into_iter().enumerate().flat_map(|(w, mut bits)| {
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + i)
            })
        })
    }
}

/// Told when a topic gains its first subscriber on this node or loses its last one; the
/// bus implements it to follow the node's interest on the broker.
pub trait InterestWatcher: Send + Sync + 'static {
    /// `topic`'s entry in the interest map appeared or went. Called synchronously by the
    /// shard that made the change: it must not block (queue the topic, or flag a rescan).
    fn changed(&self, topic: &Topic);
}

/// Which shards have at least one subscriber of each topic on this node.
pub struct Interest {
    /// Invariant: bit `i` of a topic's set is written only by shard `i`, synchronously while
    /// it handles a subscribe (set on its first local subscriber) or an unsubscribe (cleared
    /// on its last). A topic with no bits set has no entry. Publish reads it once per
    /// message, never per delivery.
    map: DashMap<Topic, ShardSet>,
    /// Told of every entry created or removed, never per message.
    watcher: Option<Arc<dyn InterestWatcher>>,
}

impl Interest {
    pub(crate) fn new(watcher: Option<Arc<dyn InterestWatcher>>) -> Self {
        Self {
            map: DashMap::new(),
            watcher,
        }
    }

    /// Whether any local shard has a subscriber of `topic`.
    pub fn contains(&self, topic: &Topic) -> bool {
        self.map.contains_key(topic)
    }

    /// Topics with at least one local subscriber.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The topics with a local subscriber, copied out (for a full rescan; not per message).
    pub fn snapshot(&self) -> Vec<Topic> {
        self.map.iter().map(|e| e.key().clone()).collect()
    }

    /// The shards interested in `topic`, copied out: no guard is held across an await.
    pub(crate) fn shards(&self, topic: &Topic) -> Option<ShardSet> {
        self.map.get(topic).map(|s| *s)
    }

    /// Shard `shard` has its first local subscriber of `topic`.
    pub(crate) fn join(&self, topic: &Topic, shard: usize) {
        let created = match self.map.entry(topic.clone()) {
            Entry::Occupied(mut e) => {
                e.get_mut().insert(shard);
                false
            }
            Entry::Vacant(e) => {
                e.insert(ShardSet::default()).insert(shard);
                true
            }
        };
        if created && let Some(w) = &self.watcher {
            w.changed(topic);
        }
    }

    /// Shard `shard` lost its last local subscriber of `topic`.
    pub(crate) fn leave(&self, topic: &Topic, shard: usize) {
        if let Some(mut set) = self.map.get_mut(topic) {
            set.remove(shard);
        }
        let removed = self.map.remove_if(topic, |_, s| s.is_empty()).is_some();
        if removed && let Some(w) = &self.watcher {
            w.changed(topic);
        }
    }
}

impl std::fmt::Debug for Interest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interest")
            .field("topics", &self.map.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_set_round_trips() {
        let mut s = ShardSet::default();
        assert!(s.is_empty());
        for i in [0, 63, 64, 255] {
            s.insert(i);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 255]);
        s.remove(63);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 64, 255]);
    }

    #[derive(Default)]
    struct Log(std::sync::Mutex<Vec<String>>);

    impl InterestWatcher for Log {
        fn changed(&self, topic: &Topic) {
            self.0
                .lock()
                .expect("no test thread panicked holding it")
                .push(topic.to_string());
        }
    }

    #[test]
    fn the_watcher_hears_of_entries_created_and_removed_only() {
        let log = Arc::new(Log::default());
        let interest = Interest::new(Some(log.clone()));
        let t = Topic::new("t").expect("a valid topic");
        interest.join(&t, 0);
        interest.join(&t, 1); // the entry exists: no notice
        interest.leave(&t, 0); // shard 1 still has it
        assert!(interest.contains(&t));
        interest.leave(&t, 1);
        assert!(!interest.contains(&t));
        let seen = log.0.lock().expect("not poisoned").clone();
        assert_eq!(seen, ["t", "t"]);
    }
}
