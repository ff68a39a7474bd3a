//! In-process engine micro-benchmarks, no sockets: a shard's fan-out of one publish to K
//! subscribers' queues (K = 1k, 10k, 100k), two shards doing it at once on two threads, and
//! the timer wheel inserting, touching and
//! expiring 100k deadlines.
//!
//! Run with `cargo bench --bench engine`.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shardcast_core::TimerWheel;
use shardcast_core::internals::FanoutFixture;

/// Publishes between two queue drains; the drain is not timed.
const BURST: usize = 16;
const PAYLOAD: usize = 64;
const DEADLINES: u64 = 100_000;

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("shard_fanout");
    for k in [1_000, 10_000, 100_000] {
        let mut fixture = FanoutFixture::new(k, PAYLOAD, BURST);
        group.throughput(Throughput::Elements(k as u64));
        group.bench_function(BenchmarkId::from_parameter(k), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let burst = left.min(BURST as u64);
                    let start = Instant::now();
                    for _ in 0..burst {
                        fixture.publish();
                    }
                    timed += start.elapsed();
                    fixture.drain();
                    left -= burst;
                }
                timed
            });
        });
        black_box(fixture.deliveries());
    }
    group.finish();
}

/// Two shards on two threads fan the same frame out at once, `k` subscribers each, as every
/// shard does for a publish: each appends the one shared frame to its own ring, so the two
/// threads share no counter. Time per publish is the slower thread's.
fn fanout_two_shards(c: &mut Criterion) {
    let mut group = c.benchmark_group("shard_fanout_two_shards");
    let k = 5_000;
    let mut fixtures = [
        FanoutFixture::new(k, PAYLOAD, BURST),
        FanoutFixture::new(k, PAYLOAD, BURST),
    ];
    let frame = fixtures[0].frame();
    group.throughput(Throughput::Elements(2 * k as u64));
    {
        group.bench_function("shared", |b| {
            b.iter_custom(|iters| {
                let barrier = Barrier::new(2);
                std::thread::scope(|scope| {
                    let handles: Vec<_> = fixtures
                        .iter_mut()
                        .map(|fixture| {
                            let (barrier, frame) = (&barrier, &frame);
                            scope.spawn(move || {
                                let mut timed = Duration::ZERO;
                                let mut left = iters;
                                while left > 0 {
                                    let burst = left.min(BURST as u64);
                                    barrier.wait();
                                    let start = Instant::now();
                                    for _ in 0..burst {
                                        fixture.publish_frame(frame);
                                    }
                                    timed += start.elapsed();
                                    fixture.drain();
                                    left -= burst;
                                }
                                timed
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        // A panic in a publishing thread is a bug worth the bench's failure.
                        .map(|h| h.join().expect("publishing thread"))
                        .max()
                        .unwrap_or_default()
                })
            });
        });
    }
    group.finish();
    for f in &fixtures {
        black_box(f.deliveries());
    }
}

fn wheel(c: &mut Criterion) {
    let mut group = c.benchmark_group("timer_wheel");
    group.throughput(Throughput::Elements(DEADLINES));
    // Deadlines spread over 10 000 ticks (1000 s at the default 100 ms tick).
    let at = |i: u64| 1 + (i * 7919) % 10_000;
    group.bench_function("insert_100k", |b| {
        b.iter(|| {
            let mut w = TimerWheel::new(1024);
            for i in 0..DEADLINES {
                w.schedule(at(i), i);
            }
            black_box(w.len())
        });
    });
    // A touch is a fresh entry; the stale one is skipped when it fires (lazy cancellation).
    let full = || {
        let mut w = TimerWheel::new(1024);
        for i in 0..DEADLINES {
            w.schedule(at(i), i);
        }
        w
    };
    group.bench_function("touch_100k", |b| {
        b.iter_batched(
            full,
            |mut w| {
                for i in 0..DEADLINES {
                    w.schedule(at(i) + 200, i);
                }
                w
            },
            criterion::BatchSize::LargeInput,
        );
    });
    group.bench_function("expire_100k", |b| {
        b.iter_batched(
            full,
            |mut w| {
                let mut fired = Vec::with_capacity(DEADLINES as usize);
                w.advance(10_000, &mut fired);
                assert_eq!(fired.len(), DEADLINES as usize);
                fired
            },
            criterion::BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(benches, fanout, fanout_two_shards, wheel);
criterion_main!(benches);
