//! End-to-end fan-out over loopback: one server-side publisher, 1000 WebSocket subscribers of
//! one topic, all in this process; reports deliveries per second.
//!
//! One iteration publishes `MESSAGES` 64-byte binary messages with `Relay::publish` and waits
//! until every subscriber has received all of them (`SUBSCRIBERS * MESSAGES` deliveries).
//! Run with `cargo bench --bench fanout`.
//!
//! 1000 subscribers are 2000 sockets in this process (client and server ends) plus the
//! listener; the machine this was written on has a 20000 open-file limit (`ulimit -n`), so
//! that fits. Raise the limit before raising `SUBSCRIBERS` past a few thousand.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use shardcast::{Config, DisconnectReason, Opcode, Relay, Server, Topic};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio_tungstenite::tungstenite::Message;

const SUBSCRIBERS: usize = 1000;
/// Messages published per iteration.
const MESSAGES: u64 = 100;
const PAYLOAD: usize = 64;
/// Handshakes in flight at once while the subscribers connect.
const CONNECT_CONCURRENCY: usize = 64;

/// How far the subscribers are through the current iteration.
struct Tally {
    /// Subscribers that have seen all `MESSAGES` of the current iteration.
    done: AtomicUsize,
    /// Signalled by the last subscriber to finish an iteration.
    all_done: Notify,
}

/// Reads data messages until the connection ends. Every `MESSAGES`-th message completes an
/// iteration for this subscriber; the last one to complete wakes the publisher.
async fn subscriber<S>(mut ws: tokio_tungstenite::WebSocketStream<S>, tally: Arc<Tally>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut seen = 0u64;
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Binary(_)) => {
                seen += 1;
                if seen.is_multiple_of(MESSAGES)
                    && tally.done.fetch_add(1, Ordering::AcqRel) + 1 == SUBSCRIBERS
                {
                    tally.all_done.notify_one();
                }
            }
            // Pings are answered by tungstenite itself.
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Publishes one iteration's messages and waits for every delivery.
async fn iteration(relay: &Relay, topic: &Topic, payload: &[u8], tally: &Tally) {
    tally.done.store(0, Ordering::Release);
    for _ in 0..MESSAGES {
        let shards = relay
            .publish(topic, Opcode::Binary, payload)
            .await
            .expect("publish");
        debug_assert_eq!(shards, 2);
    }
    tally.all_done.notified().await;
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let tally = Arc::new(Tally {
        done: AtomicUsize::new(0),
        all_done: Notify::new(),
    });
    let (relay, stop, server) = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let config = Config {
            shards: 2,
            ..Config::default()
        };
        let server = Server::new(listener, config).expect("valid config");
        let addr = server.local_addr().expect("local addr");
        let relay = server.relay();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        let url = format!("ws://{addr}/ws/bench");
        // The subscription is in place once the handshake returns.
        let sockets: Vec<_> = futures_util::stream::iter(0..SUBSCRIBERS)
            .map(|_| tokio_tungstenite::connect_async(url.as_str()))
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;
        for socket in sockets {
            let (ws, _) = socket.expect("websocket handshake");
            tokio::spawn(subscriber(ws, Arc::clone(&tally)));
        }
        (relay, stop, server)
    });
    let topic = Topic::new("bench").expect("valid topic");
    let payload = [0x5Au8; PAYLOAD];

    // One untimed iteration: every subscriber is connected and receives everything.
    rt.block_on(async {
        assert_eq!(relay.stats().await.connections, SUBSCRIBERS);
        let check = tokio::time::timeout(
            Duration::from_secs(30),
            iteration(&relay, &topic, &payload, &tally),
        );
        check.await.expect("all deliveries of the first iteration");
    });

    let mut group = c.benchmark_group("fanout");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(3));
    group.measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64 * MESSAGES));
    group.bench_function(format!("{SUBSCRIBERS}x{MESSAGES}x{PAYLOAD}B"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    iteration(&relay, &topic, &payload, &tally).await;
                }
                start.elapsed()
            })
        })
    });
    group.finish();

    // Nobody may have been dropped along the way (a slow consumer would distort the figure).
    rt.block_on(async {
        let stats = relay.stats().await;
        assert_eq!(
            stats.connections, SUBSCRIBERS,
            "subscribers lost: {stats:?}"
        );
        assert_eq!(
            stats.disconnects.get(DisconnectReason::SlowConsumer),
            0,
            "{stats:?}"
        );
        let _ = stop.send(());
        server.await.expect("server task").expect("server result");
    });
}

criterion_group!(benches, fanout);
criterion_main!(benches);
