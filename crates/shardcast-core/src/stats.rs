//! Plain counters for scrapes: the fixed-bucket histogram shards keep, with its bounds.
//! Rendering them for Prometheus lives in the server crate, not here.

/// Upper bounds of `publish_fanout_seconds`: 10 µs to 1 s.
pub const FANOUT_BOUNDS: &[f64] = &[
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
];

/// Upper bounds of `send_queue_bytes`: empty, then 1 KiB to 4 MiB.
pub const QUEUE_BOUNDS: &[f64] = &[
    0.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
];

/// A fixed-bucket histogram with plain counters, owned by one shard and merged on scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// `counts[i]` counts values in `(bounds[i-1], bounds[i]]`; the last slot is `+Inf`.
    counts: Box<[u64]>,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1].into_boxed_slice(),
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    /// Adds `other`'s counts; both must have the same bounds.
    pub fn merge(&mut self, other: &Histogram) {
        debug_assert_eq!(self.bounds, other.bounds);
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Cumulative `(upper bound, count)` pairs, ending with `+Inf`, as Prometheus wants them.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        self.bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter())
            .map(|(bound, n)| {
                total += n;
                (bound, total)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_merge() {
        let mut a = Histogram::new(QUEUE_BOUNDS);
        a.observe(0.0);
        a.observe(1000.0);
        a.observe(1e9);
        let mut b = Histogram::new(QUEUE_BOUNDS);
        b.observe(2000.0);
        a.merge(&b);
        assert_eq!(a.count(), 4);
        let buckets = a.buckets();
        assert_eq!(buckets[0], (0.0, 1));
        assert_eq!(buckets[1], (1024.0, 2));
        assert_eq!(buckets[2], (4096.0, 3));
        assert_eq!(*buckets.last().unwrap(), (f64::INFINITY, 4)); // non-empty: bounds + Inf
    }
}
