//! Real network faults between hosts on this one machine (`common::netns`): nodes, the broker
//! and the clients each in a network namespace of their own, joined by a bridge, with faults
//! injected by nftables in a host's namespace and latency by a delaying TCP proxy (an
//! [`Agent`]) in a namespace between the nodes and the broker. The nodes are the real
//! `shardcast serve` binary and the broker a real `redis-server`, each started with
//! `ip netns exec`. The test reaches them through gateways on 127.0.0.1.
//!
//! - [`partition_from_the_broker_drops_counted_and_resumes`]: one node cut off from the
//!   broker for 5 s during a publish stream.
//! - [`delay_and_loss_to_the_broker_lose_nothing`]: 100 ms each way and 1 % packet loss
//!   between the nodes and the broker; the latency they add is printed.
//! - [`heartbeats_free_clients_cut_off_by_a_partition`]: clients cut off from their node.
//!
//! Needs root, iproute2, nftables and redis-server, so every test is ignored by default:
//! `cargo test --test it -- --include-ignored netfault::`. The measured figures are printed
//! (`--nocapture`) and recorded in docs/cluster.md, "Failure tests".
//!
//! How the tests synchronise: on messages (each publisher's stream ends with `{name}-end`,
//! after which nothing may come from it), on the nodes' `/metrics` and on the broker's own
//! count of subscribers, each bounded by [`WAIT`]. The only timed waits are the faults
//! themselves and the stream's pace.
use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::brokers::{poll, redis_numsub};
use common::netns::{Agent, Net, Node, NsRedis, agent_main};
use common::*;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Not a test: the entry point of an [`Agent`], the test binary started again inside a
/// network namespace with `SHARDCAST_NETFAULT_AGENT` set. Without it, returns at once.
#[test]
#[ignore = "the forwarder the netfault tests start; does nothing on its own"]
fn agent_process() {
    agent_main();
}

// ---------------------------------------------------------------------------------------
// Streams of numbered messages

/// Publishes `{name}-{i}` every `every` until `stop` is set or `limit` are sent, then
/// `{name}-end`. Returns when each was sent.
async fn publish_stream(
    tx: &mut SplitSink<Ws, Message>,
    name: &str,
    every: Duration,
    limit: usize,
    stop: &AtomicBool,
) -> Vec<Instant> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = Vec::new();
    while sent.len() < limit && !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        sent.push(Instant::now());
        let text = format!("{name}-{}", sent.len() - 1);
        tx.send(Message::text(text)).await.expect("publish");
    }
    tx.send(Message::text(format!("{name}-end")))
        .await
        .expect("publish the end marker");
    sent
}

/// Every data message on `rx` with when it arrived, until each of `names` has sent its end
/// marker. Unbounded: the caller bounds it.
async fn record(mut rx: SplitStream<Ws>, names: &[&str]) -> Vec<(Instant, String)> {
    let mut log = Vec::new();
    let mut ended = 0;
    while ended < names.len() {
        match rx.next().await {
            Some(Ok(Message::Text(t))) => {
                let t = t.to_string();
                if names.iter().any(|n| t == format!("{n}-end")) {
                    ended += 1;
                }
                log.push((Instant::now(), t));
            }
            Some(Ok(_)) => {}
            other => panic!("the stream ended before every end marker: {other:?}"),
        }
    }
    log
}

/// The messages of publisher `name` in `log`: (number, arrival), in arrival order. Fails
/// the test on a duplicate and on anything after the end marker. Order is for the caller
/// to check (see [`reordered`]).
fn from(log: &[(Instant, String)], name: &str) -> Vec<(usize, Instant)> {
    let prefix = format!("{name}-");
    let mut got: Vec<(usize, Instant)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut ended = false;
    for (at, m) in log {
        let Some(rest) = m.strip_prefix(&prefix) else {
            continue;
        };
        assert!(!ended, "{m:?} after {name}'s end marker: a duplicate");
        if rest == "end" {
            ended = true;
            continue;
        }
        let n: usize = rest.parse().expect("a message number");
        assert!(seen.insert(n), "{m:?} twice: a duplicate");
        got.push((n, *at));
    }
    assert!(ended, "no end marker from {name}");
    got
}

/// The messages in `got` that arrived after one published later than them.
fn reordered(got: &[(usize, Instant)]) -> Vec<usize> {
    let mut highest = None;
    let mut late = Vec::new();
    for &(n, _) in got {
        if highest.is_some_and(|h| n < h) {
            late.push(n);
        }
        highest = highest.max(Some(n));
    }
    late
}

/// The `q` quantile of `d` (sorted here).
fn quantile(d: &mut [Duration], q: f64) -> Duration {
    d.sort();
    d[((d.len() - 1) as f64 * q).round() as usize]
}

/// Publish-to-receipt times of `got`.
fn latencies(got: &[(usize, Instant)], sent: &[Instant]) -> Vec<Duration> {
    got.iter().map(|&(n, at)| at - sent[n]).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A node's bus counters, as its `/metrics` has them.
#[derive(Debug)]
struct BusCounters {
    published: f64,
    dropped_disconnected: f64,
    dropped_full: f64,
    reconnects: f64,
    stalls: f64,
}

async fn bus_counters(node: &Node) -> BusCounters {
    let text = node.metrics().await;
    let m = |name: &str| netns_metric(&text, name);
    BusCounters {
        published: m("shardcast_bus_published_total"),
        dropped_disconnected: m("shardcast_bus_dropped_disconnected_total"),
        dropped_full: m("shardcast_bus_dropped_full_total"),
        reconnects: m("shardcast_bus_reconnects_total"),
        stalls: m("shardcast_bus_stall_detected_total"),
    }
}

use common::netns::metric_sum as netns_metric;

/// Starts a node on `host` joined to the bus at `url` and waits for its session.
async fn bus_node(net: &Net, host: &str, url: &str) -> Node {
    let node = Node::start(net, host, &["--bus", url]).await;
    node.metric_until("shardcast_bus_connected", |v| v == 1.0)
        .await;
    node
}

/// Waits until the Redis behind `redis` counts `n` subscribers of `topic`'s channel.
async fn subscribers(redis: &NsRedis, topic: &str, n: usize) {
    let channel = format!("shardcast:{topic}");
    let port = redis.admin.port;
    let what = format!("{n} subscribers of {channel} on the broker");
    poll(&what, || {
        let channel = channel.clone();
        async move { redis_numsub(port, None, false, &channel).await == n }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 1. A node cut off from the broker

/// Nodes A and B on Redis, each with one client that publishes a numbered message every
/// 10 ms to `stream` (a topic without history) and reads what comes back: its own messages
/// (local delivery) and the other's (across the bus). After 1 s, nftables drops everything
/// between A and the broker for 5 s; the connections stay open, nothing is refused, so A
/// finds out by its probe or a command timing out.
///
/// Checks: both clients get every one of their own messages, in order, each within 1 s,
/// throughout; no message arrives twice or out of order anywhere; everything sent before
/// the partition crosses; cross-node delivery, both ways, resumes for every message sent
/// from at most 2 s after the heal on; nothing sent during the partition arrives more than
/// 1 s late (the connection A gave up is reset, so the kernel does not retransmit its
/// publishes once the network heals); A counts every message it did not hand the broker in
/// `shardcast_bus_dropped_*`, and none B missed went uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iproute2, nftables and redis-server"]
async fn partition_from_the_broker_drops_counted_and_resumes() {
    const EVERY: Duration = Duration::from_millis(10);
    let net = Net::new(&[("redis", 1), ("a", 2), ("b", 3)]);
    let redis = NsRedis::start(&net, "redis").await;
    let url = format!("redis://{}", redis.addr);
    let a = bus_node(&net, "a", &url).await;
    let b = bus_node(&net, "b", &url).await;
    let (mut atx, arx) = a.ws("/ws/stream").await.split();
    let (mut btx, brx) = b.ws("/ws/stream").await.split();
    subscribers(&redis, "stream", 2).await;

    let records = [
        tokio::spawn(record(arx, &["a", "b"])),
        tokio::spawn(record(brx, &["a", "b"])),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let (s1, s2) = (Arc::clone(&stop), Arc::clone(&stop));
    let pa =
        tokio::spawn(async move { publish_stream(&mut atx, "a", EVERY, usize::MAX, &s1).await });
    let pb =
        tokio::spawn(async move { publish_stream(&mut btx, "b", EVERY, usize::MAX, &s2).await });

    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut = Instant::now();
    net.partition("a", "redis");
    a.metric_until("shardcast_bus_connected", |v| v == 0.0)
        .await;
    let noticed = cut.elapsed();
    tokio::time::sleep_until(cut + Duration::from_secs(5)).await;
    net.heal("a");
    let healed = Instant::now();
    a.metric_until("shardcast_bus_connected", |v| v == 1.0)
        .await;
    let reconnected = healed.elapsed();
    subscribers(&redis, "stream", 2).await;
    // Long enough after the heal to see delivery resume (or not) within 2 s.
    tokio::time::sleep_until(
        (healed + Duration::from_secs(3)).max(Instant::now() + Duration::from_secs(1)),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let sent_a = within("A's stream", pa).await.expect("publisher A");
    let sent_b = within("B's stream", pb).await.expect("publisher B");
    let [ra, rb] = records;
    let log_a = within("A's client to get both end markers", ra)
        .await
        .expect("reader A");
    let log_b = within("B's client to get both end markers", rb)
        .await
        .expect("reader B");

    println!(
        "partition: A noticed after {noticed:?}, had its session back {reconnected:?} after the heal; \
         {} messages from A, {} from B",
        sent_a.len(),
        sent_b.len()
    );
    // Local delivery, throughout.
    for (name, log, sent) in [("a", &log_a, &sent_a), ("b", &log_b, &sent_b)] {
        let own = from(log, name);
        let numbers: Vec<usize> = own.iter().map(|&(n, _)| n).collect();
        assert_eq!(
            numbers,
            (0..sent.len()).collect::<Vec<_>>(),
            "{name}'s client missed some of its own messages"
        );
        let mut lat = latencies(&own, sent);
        let worst = quantile(&mut lat, 1.0);
        println!(
            "partition: local delivery on {name}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(quantile(&mut lat, 0.5)),
            ms(quantile(&mut lat, 0.99)),
            ms(worst)
        );
        assert!(
            worst < Duration::from_secs(1),
            "local delivery on {name} paused for {worst:?}"
        );
    }
    // Across the bus: nothing before the cut lost, resumed within 2 s of the heal.
    for (what, got, sent) in [
        ("A -> B", from(&log_b, "a"), &sent_a),
        ("B -> A", from(&log_a, "b"), &sent_b),
    ] {
        let received: std::collections::HashSet<usize> = got.iter().map(|&(n, _)| n).collect();
        let before: Vec<usize> = (0..sent.len())
            .filter(|&n| sent[n] + Duration::from_millis(200) < cut && !received.contains(&n))
            .collect();
        assert!(
            before.is_empty(),
            "{what}: lost before the partition: {before:?}"
        );
        let resumed = (0..sent.len())
            .rev()
            .take_while(|n| received.contains(n))
            .last()
            .unwrap_or_else(|| panic!("{what}: the last message never crossed"));
        let after_heal = sent[resumed].saturating_duration_since(healed);
        let during: Vec<(usize, Duration)> = got
            .iter()
            .filter(|&&(n, _)| sent[n] >= cut && sent[n] < healed)
            .map(|&(n, at)| (n, at - sent[n]))
            .collect();
        let late = during
            .iter()
            .filter(|(_, d)| *d > Duration::from_secs(1))
            .count();
        let out_of_order = reordered(&got);
        println!(
            "partition: {what}: {} of {} crossed; every message sent from {:.0} ms after the heal on crossed; \
             {} sent during the partition crossed, {late} of them more than 1 s late (latest {:?}); \
             {} arrived after a later one: {:?}",
            got.len(),
            sent.len(),
            ms(after_heal),
            during.len(),
            during.iter().map(|(_, d)| *d).max(),
            out_of_order.len(),
            out_of_order.iter().take(5).collect::<Vec<_>>()
        );
        assert!(
            after_heal <= Duration::from_secs(2),
            "{what}: cross-node delivery resumed {after_heal:?} after the heal"
        );
        // Never replayed late: what A gave up on is gone with its reset connection.
        assert_eq!(late, 0, "{what}: messages of the partition delivered late");
        assert!(
            out_of_order.is_empty(),
            "{what}: out of order: {out_of_order:?}"
        );
    }
    // The drops are counted: every message of A was handed to the broker or counted as
    // dropped, and B missed none that A counted as handed over.
    let ca = bus_counters(&a).await;
    let cb = bus_counters(&b).await;
    println!("partition: A's counters {ca:?}; B's {cb:?}");
    let dropped = ca.dropped_disconnected + ca.dropped_full;
    assert_eq!(
        ca.published + dropped,
        (sent_a.len() + 1) as f64,
        "A's messages: each published or counted as dropped"
    );
    assert!(dropped >= 1.0, "no drop counted: {ca:?}");
    let crossed = from(&log_b, "a").len() as f64 + 1.0;
    assert!(
        crossed >= ca.published,
        "B got {crossed} of A's messages, A counted {} as published",
        ca.published
    );
    assert!(ca.reconnects >= 1.0 && ca.stalls >= 1.0, "{ca:?}");
    assert_eq!(cb.reconnects, 0.0, "B kept its session: {cb:?}");
}

// ---------------------------------------------------------------------------------------
// 2. Latency and loss between the nodes and the broker

/// What one run of [`latency_run`] measured.
struct Run {
    local: Vec<Duration>,
    remote: Vec<Duration>,
    connect: Duration,
    probe: f64,
}

/// Nodes A and B on the bus at `url`; a client on A publishes `N` numbered messages, one
/// every 5 ms, to `lat`, which it and a client on B read. Each gets every message exactly
/// once, in order; neither node loses its session, stalls or drops anything. Returns the
/// publish-to-receipt times on A and on B, how long the nodes took to have a session, and
/// the mean probe round trip.
async fn latency_run(net: &Net, redis: &NsRedis, url: &str) -> Run {
    const N: usize = 1000;
    let start = Instant::now();
    let a = bus_node(net, "a", url).await;
    let b = bus_node(net, "b", url).await;
    let connect = start.elapsed();
    let (mut atx, arx) = a.ws("/ws/lat").await.split();
    let (_btx, brx) = b.ws("/ws/lat").await.split();
    subscribers(redis, "lat", 2).await;
    let ra = tokio::spawn(record(arx, &["a"]));
    let rb = tokio::spawn(record(brx, &["a"]));
    let never = AtomicBool::new(false);
    let sent = publish_stream(&mut atx, "a", Duration::from_millis(5), N, &never).await;
    let log_a = within("A's client to get the end marker", ra)
        .await
        .expect("reader A");
    let log_b = within("B's client to get the end marker", rb)
        .await
        .expect("reader B");
    let (got_a, got_b) = (from(&log_a, "a"), from(&log_b, "a"));
    let (ca, cb) = (bus_counters(&a).await, bus_counters(&b).await);
    let numbers = |got: &[(usize, Instant)]| got.iter().map(|&(n, _)| n).collect::<Vec<_>>();
    assert_eq!(
        numbers(&got_a),
        (0..N).collect::<Vec<_>>(),
        "A's own client: not exactly once"
    );
    // Across the bus: B gets every message exactly once, in order, and neither node loses
    // its session. TCP retransmits what the loss rule drops (200 ms at most per loss here);
    // a stall takes a probe 2 s late.
    assert_eq!(
        numbers(&got_b),
        (0..N).collect::<Vec<_>>(),
        "B: not exactly once, in order (A {ca:?}, B {cb:?})"
    );
    for (node, c) in [("A", &ca), ("B", &cb)] {
        assert_eq!(
            (
                c.reconnects,
                c.stalls,
                c.dropped_disconnected,
                c.dropped_full
            ),
            (0.0, 0.0, 0.0, 0.0),
            "{node} lost its session or dropped: {c:?}"
        );
    }
    let mut probe = 0.0;
    let text = b.metrics().await;
    let count = netns_metric(&text, "shardcast_bus_round_trip_seconds_count");
    if count > 0.0 {
        probe = netns_metric(&text, "shardcast_bus_round_trip_seconds_sum") / count;
    }
    Run {
        local: latencies(&got_a, &sent),
        remote: latencies(&got_b, &sent),
        connect,
        probe,
    }
}

/// The same [`latency_run`] twice: through a proxy that forwards at once (the baseline),
/// then through one that holds each direction's bytes for 100 ms, with nftables dropping
/// 1 % of the packets that reach the proxy's host (so 1 % each way on the node-broker
/// path). TCP retransmits what is lost: every message still arrives exactly once, and no
/// bus session times out (its commands have 2 s, its probe 2 s). Prints the latency added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iproute2, nftables and redis-server"]
async fn delay_and_loss_to_the_broker_lose_nothing() {
    let net = Net::new(&[("redis", 1), ("a", 2), ("b", 3), ("proxy", 9)]);
    let redis = NsRedis::start(&net, "redis").await;
    let _direct = Agent::proxy(
        &net,
        "proxy",
        &net.addr("proxy", 6380),
        &redis.addr,
        Duration::ZERO,
    );
    let _slow = Agent::proxy(
        &net,
        "proxy",
        &net.addr("proxy", 6379),
        &redis.addr,
        Duration::from_millis(100),
    );
    let base = latency_run(
        &net,
        &redis,
        &format!("redis://{}", net.addr("proxy", 6380)),
    )
    .await;
    net.loss("proxy", 1);
    let slow = latency_run(
        &net,
        &redis,
        &format!("redis://{}", net.addr("proxy", 6379)),
    )
    .await;
    let lost = net.lost("proxy");
    let report = |what: &str, run: Run| {
        let (mut l, mut r) = (run.local, run.remote);
        println!(
            "delay+loss: {what}: same node p50 {:.2} ms p99 {:.2} ms; other node p50 {:.2} ms p99 {:.2} ms; \
             sessions up {:?} after start; mean probe round trip {:.1} ms",
            ms(quantile(&mut l, 0.5)),
            ms(quantile(&mut l, 0.99)),
            ms(quantile(&mut r, 0.5)),
            ms(quantile(&mut r, 0.99)),
            run.connect,
            run.probe * 1000.0
        );
        (quantile(&mut r, 0.5), quantile(&mut r, 0.99))
    };
    let (b50, b99) = report("no fault", base);
    let (s50, s99) = report("100 ms each way, 1 % loss", slow);
    println!(
        "delay+loss: added across nodes: p50 {:.1} ms, p99 {:.1} ms; {lost} packets dropped by the loss rule",
        ms(s50.saturating_sub(b50)),
        ms(s99.saturating_sub(b99))
    );
    assert!(lost > 0, "the loss rule dropped nothing");
    assert!(
        s50 >= b50 + Duration::from_millis(190),
        "the proxy's 100 ms each way did not show: p50 {s50:?} against {b50:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Clients cut off from their node

/// How many clients [`heartbeats_free_clients_cut_off_by_a_partition`] holds.
const CLIENTS: usize = 1000;
/// Messages each of them receives first, so that the node has used buffers for them.
const EACH: usize = 20;

/// Opens [`CLIENTS`] WebSockets to `node` through `gw`, over 10 topics, each read by a task
/// that counts the text messages in `got` (and answers pings).
async fn open_clients(
    node: &Node,
    gw: &Agent,
    got: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let paths: Vec<String> = (0..CLIENTS)
        .map(|i| format!("/ws/room-{}", i % 10))
        .collect();
    for chunk in paths.chunks(100) {
        let opened =
            futures_util::future::join_all(chunk.iter().map(|p| gw.ws(&node.addr, p))).await;
        for mut ws in opened {
            let got = Arc::clone(got);
            tasks.push(tokio::spawn(async move {
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    node.metric_until("shardcast_connections", |v| v == CLIENTS as f64)
        .await;
    tasks
}

/// Publishes [`EACH`] 1 KiB messages to each of the 10 topics over `POST /publish` and waits
/// until every client has them.
async fn feed(node: &Node, got: &AtomicUsize) {
    got.store(0, Ordering::Relaxed);
    let body = "x".repeat(1024);
    for _ in 0..EACH {
        for room in 0..10 {
            let req = format!(
                "POST /publish/room-{room} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let gateway = std::net::SocketAddr::from(([127, 0, 0, 1], node.admin.port));
            let (status, _) = raw_http(gateway, req.as_bytes()).await;
            assert!((200..300).contains(&status), "publish: {status}");
        }
    }
    let all = tokio::time::timeout(WAIT, async {
        while got.load(Ordering::Relaxed) < CLIENTS * EACH {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if all.is_err() {
        let text = node.metrics().await;
        let disconnects: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("shardcast_disconnects_total")
                    || l.starts_with("shardcast_connections")
            })
            .collect();
        panic!(
            "{} of {} messages reached the clients; {disconnects:?}",
            got.load(Ordering::Relaxed),
            CLIENTS * EACH
        );
    }
}

/// A node with `--ping-interval 1s --pong-timeout 1s` and [`CLIENTS`] clients in a host of
/// their own, each answering pings. nftables then drops everything between the clients'
/// host and the node: the connections stay open on both sides, and only the node's
/// heartbeat can find them dead. Every one is closed (`pong_timeout`) within ping interval
/// + pong timeout + the wheel's tick + the close grace (1 s) of the partition, and the
/// node's resident memory and open descriptors return to their level before the clients
/// came (measured after a first round of as many clients, opened and closed cleanly, so
/// that the allocator has grown as it will).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iproute2, nftables and redis-server"]
async fn heartbeats_free_clients_cut_off_by_a_partition() {
    const PING: Duration = Duration::from_secs(1);
    const PONG: Duration = Duration::from_secs(1);
    /// The wheel's tick at these settings (the shortest of them and the grace, / 8, at most
    /// 100 ms) and the close grace.
    const TICK: Duration = Duration::from_millis(100);
    const GRACE: Duration = Duration::from_secs(1);
    let net = Net::new(&[("a", 2), ("clients", 20)]);
    let node = Node::start(
        &net,
        "a",
        &["--ping-interval", "1s", "--pong-timeout", "1s"],
    )
    .await;
    let gw = Agent::gateway(&net, "clients", &node.addr);
    let got = Arc::new(AtomicUsize::new(0));
    let cold = node.rss();

    // A first round, closed cleanly: the level the node returns to.
    let warm = open_clients(&node, &gw, &got).await;
    feed(&node, &got).await;
    for t in &warm {
        t.abort();
    }
    node.metric_until("shardcast_connections", |v| v == 0.0)
        .await;
    let idle = node.rss();
    let idle_fds = node.metric("process_open_fds").await;

    let clients = open_clients(&node, &gw, &got).await;
    feed(&node, &got).await;
    let busy = node.rss();
    // The control: with the path up, the clients answer the pings and stay.
    tokio::time::sleep(PING + PONG + Duration::from_millis(500)).await;
    assert_eq!(node.metric("shardcast_connections").await, CLIENTS as f64);
    let text = node.metrics().await;
    let timed_out = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("shardcast_disconnects_total{reason=\"pong_timeout\"} "))
            .map(|v| v.trim().parse::<f64>().expect("a number"))
            .expect("the pong_timeout series")
    };
    assert_eq!(timed_out(&text), 0.0, "clients answering pings timed out");

    let cut = Instant::now();
    net.partition("clients", "a");
    node.metric_until("shardcast_connections", |v| v == 0.0)
        .await;
    let freed = cut.elapsed();
    let bound = PING + PONG + TICK + GRACE;
    assert_eq!(timed_out(&node.metrics().await), CLIENTS as f64);
    // RSS and descriptors back to their level; the allocator may take a moment to return
    // pages.
    let margin = 2 * 1024 * 1024;
    let settle = Instant::now();
    poll("the node's memory to return to its idle level", || async {
        node.rss() <= idle + margin
    })
    .await;
    let after = node.rss();
    let fds = node.metric("process_open_fds").await;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "clients partition: {CLIENTS} clients freed {freed:?} after the cut (bound {bound:?}); \
         RSS {:.1} MiB cold, {:.1} MiB idle after a first round, {:.1} MiB with the clients, \
         {:.1} MiB after ({:?} to settle); {idle_fds} descriptors idle, {fds} after",
        mib(cold),
        mib(idle),
        mib(busy),
        mib(after),
        settle.elapsed()
    );
    // Slack for a loaded machine: the shard's timers run late when both cores are busy.
    assert!(
        freed <= bound + Duration::from_millis(500),
        "the dead clients were freed {freed:?} after the partition, bound {bound:?}"
    );
    assert_eq!(fds, idle_fds, "descriptors not returned");
    for t in clients {
        t.abort();
    }
    drop(gw);
}
