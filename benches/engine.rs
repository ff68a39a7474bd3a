//! Engine micro-benchmarks, in one process:
//! - `shard_fanout/{1000,10000,100000}`: a shard's fan-out of one publish to K subscribers'
//!   queues, no sockets; `shard_fanout_two_shards`: two shards doing it at once on two
//!   threads.
//! - `shard_fanout_sockets/10000`: the whole path of one 64-byte publish to 10,000
//!   subscribers, each with a real socket (one end of a local socket pair): the publish and
//!   the flush that writes it to every socket are timed, reading it back at the far ends is
//!   not. 10,000 socket pairs take 20,000 descriptors; where the open-file limit (raised to
//!   its hard limit at the start) cannot hold them, it runs 5,000 subscribers and is named
//!   `shard_fanout_sockets/5000`.
//! - `chat_round/200`: 200 clients on one topic each publish one 20-byte message, then one
//!   flush writes the 40,000 deliveries; timed as above.
//! - `timer_wheel`: inserting, touching and expiring 100k deadlines.
//!
//! The socket benches go through `SocketFixture`, whose calls name no shard internals, so
//! they measure any engine behind them. Run with `cargo bench --bench engine`.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use shardcast_core::TimerWheel;
use shardcast_core::internals::{FanoutFixture, SocketFixture};

/// Publishes between two queue drains; the drain is not timed.
const BURST: usize = 16;
const PAYLOAD: usize = 64;
const DEADLINES: u64 = 100_000;
/// Subscribers of `shard_fanout_sockets`, and the fallback where the descriptors run short.
const SOCKET_SUBSCRIBERS: usize = 10_000;
const SOCKET_SUBSCRIBERS_FALLBACK: usize = 5_000;
/// Descriptors beyond the socket pairs': standard streams, the runtime's, criterion's files.
const FD_HEADROOM: u64 = 64;
/// Clients of `chat_round`, and the payload each publishes per round.
const CHAT_CLIENTS: usize = 200;
const CHAT_PAYLOAD: usize = 20;

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

/// One publish of `PAYLOAD` bytes to `SOCKET_SUBSCRIBERS` sockets, written by one flush.
fn fanout_sockets(c: &mut Criterion) {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let k = if limit >= 2 * SOCKET_SUBSCRIBERS as u64 + FD_HEADROOM {
        SOCKET_SUBSCRIBERS
    } else {
        eprintln!(
            "shard_fanout_sockets: {limit} open files allowed, too few for \
             {SOCKET_SUBSCRIBERS} socket pairs; measuring {SOCKET_SUBSCRIBERS_FALLBACK}"
        );
        SOCKET_SUBSCRIBERS_FALLBACK
    };
    let mut group = c.benchmark_group("shard_fanout_sockets");
    group.throughput(Throughput::Elements(k as u64));
    socket_rounds(&mut group, BenchmarkId::from_parameter(k), || {
        SocketFixture::fanout(k, PAYLOAD)
    });
    group.finish();
}

/// `CHAT_CLIENTS` clients on one topic each publish once, then one flush: n² deliveries.
fn chat_round(c: &mut Criterion) {
    let n = CHAT_CLIENTS;
    let mut group = c.benchmark_group("chat_round");
    group.throughput(Throughput::Elements((n * n) as u64));
    socket_rounds(&mut group, BenchmarkId::from_parameter(n), || {
        SocketFixture::chat(n, CHAT_PAYLOAD)
    });
    group.finish();
}

/// Benches rounds of the fixture `build` makes (only if the filter selects `id`, and once):
/// the publishes and the flush are timed, reading every far end back is not.
fn socket_rounds(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    build: impl Fn() -> SocketFixture,
) {
    let mut fixture = None;
    group.bench_function(id, |b| {
        let fixture = fixture.get_or_insert_with(&build);
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                fixture.round();
                fixture.flush();
                timed += start.elapsed();
                black_box(fixture.read_all());
            }
            timed
        });
    });
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

criterion_group!(
    benches,
    fanout,
    fanout_two_shards,
    fanout_sockets,
    chat_round,
    wheel
);
criterion_main!(benches);
