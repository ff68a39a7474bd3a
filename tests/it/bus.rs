//! The bus against real brokers: three nodes joined through a standalone Redis, a 3-node
//! Redis Cluster (sharded pub/sub) or a NATS server, each started here on free loopback ports
//! and killed when the test ends. Exact counts, no loss, no duplicates, per-publisher order;
//! `POST /publish` across nodes; a broker killed and restarted; a frozen broker (local
//! delivery never pauses); a silent stall (a proxy swallows what the broker sends); a node
//! killed with SIGKILL; interest-based subscription, batching and sharded pub/sub checked on
//! the broker itself; and a measurement of the bus's throughput and added latency. The
//! brokers, the silent proxy and process handles are in `common::brokers`; the helpers for
//! nodes and messages come first here, the tests after.
//!
//! Needs `redis-server`, `redis-cli` and `nats-server` on the PATH, so every broker test is
//! ignored by default: `cargo test --test it -- --include-ignored bus::`. Without a binary a test
//! fails with a message saying what to install; it never passes without a broker. The last
//! test needs no broker: a node whose broker is missing still serves locally.
//!
//! How the tests synchronise, without sleeping:
//! - **End markers.** A publisher's messages to a topic travel one path (one node, one bus
//!   queue, one broker connection, one channel), so they reach every receiver in order. Each
//!   publisher ends with `{name}-end`; a receiver that has it has everything sent before it,
//!   and anything after it from that publisher would be a duplicate.
//! - **The broker's own view.** Who is subscribed to a channel is read from the broker
//!   (`PUBSUB NUMSUB`, `PUBSUB SHARDNUMSUB` on every cluster primary, NATS `/connz?subs=1`).
//!   Nothing pushes that state to a client, so it is polled, bounded by [`WAIT`]; so is a
//!   node's own bus flag, which the library exposes only as a getter (see [`poll`]).
use crate::common;

use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use common::brokers::*;
use common::*;
use futures_util::SinkExt;
use shardcast::{BusConfig, BusStats, BusUrl, Config, Opcode, Topic};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------
// Nodes

/// A node's settings: test defaults plus the bus. The probe interval stays at its default
/// so a busy test machine does not mistake a slow probe for a stall.
fn node_config(url: &BusUrl) -> Config {
    Config {
        bus: Some(BusConfig::new(url.clone())),
        ..config()
    }
}

/// Starts `n` in-process nodes and waits until each has its bus session, so that their
/// handshakes wait for broker subscriptions from then on.
async fn start_nodes(url: &BusUrl, n: usize) -> Vec<TestServer> {
    start_nodes_with(&BusConfig::new(url.clone()), n).await
}

/// [`start_nodes`] with these bus settings.
async fn start_nodes_with(bus: &BusConfig, n: usize) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        let c = Config {
            bus: Some(bus.clone()),
            ..config()
        };
        nodes.push(start(c).await);
    }
    for node in &nodes {
        connected(node).await;
    }
    nodes
}

async fn connected(node: &TestServer) {
    poll("the node's bus session", || async move {
        node.relay.bus_connected()
    })
    .await;
}

fn bus(stats: &shardcast::Stats) -> &BusStats {
    stats
        .bus
        .as_ref()
        .expect("a node started with --bus has bus stats")
}

/// Stops every node at once. Close the test's clients first: the drain waits for open ones.
async fn stop_all(nodes: Vec<TestServer>) {
    futures_util::future::join_all(nodes.into_iter().map(TestServer::stop)).await;
}

/// A `shardcast serve --bus` process, for a node that dies by SIGKILL.
async fn spawn_node(url: &BusUrl) -> Proc {
    let port = free_port();
    let args = node_args(&BusConfig::new(url.clone()), port);
    let node = Proc::spawn(env!("CARGO_BIN_EXE_shardcast"), args, port);
    serving(port).await;
    node
}

/// [`spawn_node`] with these bus settings, logging at `rust_log`, with the lines it logs.
async fn spawn_node_logged(bus: &BusConfig, rust_log: &str) -> (Proc, UnboundedReceiver<String>) {
    let port = free_port();
    let bin = env!("CARGO_BIN_EXE_shardcast");
    let (node, log) = Proc::spawn_logged(bin, node_args(bus, port), port, rust_log);
    serving(port).await;
    (node, log)
}

/// `shardcast serve` on `port` with the URL and files of `bus`.
fn node_args(bus: &BusConfig, port: u16) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--bus",
        bus.url.as_str(),
        "--shards",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, file) in [
        ("--bus-ca-file", &bus.ca_file),
        ("--bus-creds-file", &bus.creds_file),
    ] {
        if let Some(path) = file {
            args.extend([flag.to_string(), path.display().to_string()]);
        }
    }
    args
}

/// Waits until the shardcast process on `port` serves `/livez`.
async fn serving(port: u16) {
    poll("the shardcast process to serve /livez", || async move {
        http_get(port, "/livez")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
}

/// Reads `log` up to the first line that has `what` in it; returns every line read. Bounded
/// by [`WAIT`].
async fn log_until(log: &mut UnboundedReceiver<String>, what: &str) -> Vec<String> {
    within(&format!("a log line with {what:?}"), async {
        let mut lines = Vec::new();
        while let Some(line) = log.recv().await {
            let done = line.contains(what);
            lines.push(line);
            if done {
                return lines;
            }
        }
        panic!(
            "the node's log ended without {what:?}:\n{}",
            lines.join("\n")
        )
    })
    .await
}

async fn ws_connect(addr: SocketAddr, path: &str) -> Ws {
    let url = format!("ws://{addr}{path}");
    let (ws, res) = within(
        "a websocket handshake",
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("websocket handshake");
    assert_eq!(res.status(), 101);
    ws
}

// ---------------------------------------------------------------------------------------
// Messages

/// Reads `n` data messages as text. Bounded by [`WAIT`].
async fn read_n(ws: &mut Ws, n: usize) -> Vec<String> {
    within("every expected message", async {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let m = next_data(ws).await;
            got.push(m.into_text().expect("text").to_string());
        }
        got
    })
    .await
}

/// Reads until every publisher in `names` has sent its end marker (`{name}-end`) and
/// returns what came before, markers left out. A message from a publisher after its marker
/// is a duplicate (it sent nothing after it) and fails the test. Bounded by [`WAIT`].
async fn read_to_markers(ws: &mut Ws, names: &[&str]) -> Vec<String> {
    within("every publisher's end marker", async {
        let mut got = Vec::new();
        let mut ended: Vec<&str> = Vec::new();
        while ended.len() < names.len() {
            let m = next_data(ws).await.into_text().expect("text").to_string();
            let from = names
                .iter()
                .find(|n| m.strip_prefix(**n).is_some_and(|r| r.starts_with('-')));
            if let Some(from) = from {
                assert!(
                    !ended.contains(from),
                    "{m:?} after {from}'s end marker: a duplicate"
                );
                if m == format!("{from}-end") {
                    ended.push(from);
                    continue;
                }
            }
            got.push(m);
        }
        got
    })
    .await
}

/// Checks that `got` holds, for each `(publisher, range)`, exactly `{publisher}-{i}` for `i`
/// in the range, in order, and nothing else.
fn assert_exactly(got: &[String], want: &[(&str, Range<usize>)]) {
    for (p, range) in want {
        let mine: Vec<&str> = got
            .iter()
            .filter_map(|m| m.strip_prefix(p))
            .filter_map(|rest| rest.strip_prefix('-'))
            .collect();
        let expect: Vec<String> = range.clone().map(|i| i.to_string()).collect();
        assert_eq!(
            mine, expect,
            "messages of {p}: lost, duplicated or reordered"
        );
    }
    let total: usize = want.iter().map(|(_, r)| r.len()).sum();
    assert_eq!(got.len(), total, "unexpected extra messages: {got:?}");
}

async fn send_all(ws: &mut Ws, name: &str, range: Range<usize>) {
    for i in range {
        ws.send(Message::text(format!("{name}-{i}")))
            .await
            .expect("publish");
    }
}

async fn send_end(ws: &mut Ws, name: &str) {
    send_text(ws, &format!("{name}-end")).await;
}

/// Publishes `{name}-{i}` for `i` in `range`, then `{name}-end`, server-side on `node`.
async fn publish_all(node: &TestServer, topic: &str, name: &str, range: Range<usize>) {
    let t = Topic::new(topic).expect("topic");
    let texts = range
        .map(|i| format!("{name}-{i}"))
        .chain([format!("{name}-end")]);
    for text in texts {
        node.relay
            .publish(&t, Opcode::Text, text.as_bytes())
            .await
            .expect("publish");
    }
}

/// The value of the unlabelled series `name` in a `/metrics` text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

// ---------------------------------------------------------------------------------------
// Every bus type: three nodes, every node publishing, exact counts

/// Three nodes; on each, one publisher and two receive-only subscribers of `room`. Each
/// publisher sends `M` messages while node B also takes `K` over `POST /publish/room`.
/// Every client gets exactly all of them, each publisher's in order, and nothing twice; the
/// counters and node B's `/metrics` agree.
async fn three_nodes_exact(broker: &impl TestBroker) {
    const M: usize = 300;
    const K: usize = 40;
    let nodes = start_nodes(&broker.url(), 3).await;
    let mut publishers = Vec::new();
    let mut subscribers = Vec::new();
    for node in &nodes {
        publishers.push(node.connect("/ws/room").await);
        subscribers.push(node.connect("/ws?topic=room").await);
        subscribers.push(node.connect("/ws?topic=room").await);
    }
    interest_is(broker, "room", 3).await;
    let names = ["node0", "node1", "node2"];
    let mut readers = publishers;
    // Publish from all three nodes at once, and over HTTP on node B; each WebSocket
    // publisher is also a subscriber.
    let sends = readers.iter_mut().zip(names).map(|(ws, name)| async move {
        send_all(ws, name, 0..M).await;
        send_end(ws, name).await;
    });
    let http = async {
        for text in (0..K)
            .map(|i| format!("http-{i}"))
            .chain(["http-end".into()])
        {
            let status = within(
                "POST /publish/room",
                nodes[1].post("/publish/room", "text/plain", text.as_bytes()),
            )
            .await;
            assert!((200..300).contains(&status), "POST /publish: {status}");
        }
    };
    futures_util::future::join(futures_util::future::join_all(sends), http).await;
    let all_names = ["node0", "node1", "node2", "http"];
    let want: Vec<(&str, Range<usize>)> = names
        .iter()
        .map(|n| (*n, 0..M))
        .chain([("http", 0..K)])
        .collect();
    let mut all: Vec<&mut Ws> = readers.iter_mut().chain(subscribers.iter_mut()).collect();
    let reads = all.iter_mut().map(|ws| async {
        assert_exactly(&read_to_markers(ws, &all_names).await, &want);
    });
    futures_util::future::join_all(reads).await;

    // Markers included: each WebSocket publisher sent M + 1, node B's HTTP K + 1 more.
    let sent = |i: usize| (M + 1 + if i == 1 { K + 1 } else { 0 }) as u64;
    let total: u64 = (0..3).map(sent).sum();
    for (i, node) in nodes.iter().enumerate() {
        // Own copies come back after the node's clients have read them locally.
        let stats = stats_until(node, "every own copy back and every delivery", |s| {
            s.bus.as_ref().is_some_and(|b| b.dropped_own == sent(i)) && s.deliveries == 3 * total
        })
        .await;
        let b = bus(&stats);
        assert_eq!(b.published, sent(i), "{b:?}");
        assert_eq!(b.received, total - sent(i), "{b:?}");
        assert_eq!(
            (b.dropped_disconnected, b.dropped_full, b.rejected),
            (0, 0, 0),
            "{b:?}"
        );
        assert_eq!(stats.published_bus, total - sent(i));
        assert_eq!(b.subscriptions, 1);
    }
    // Node B's /metrics says the same.
    let (status, text) = within(
        "GET /metrics",
        nodes[1].http("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    for (series, want) in [
        ("shardcast_bus_connected", 1),
        ("shardcast_bus_subscriptions", 1),
        ("shardcast_bus_published_total", sent(1)),
        ("shardcast_bus_received_total", total - sent(1)),
        ("shardcast_bus_dropped_own_total", sent(1)),
        ("shardcast_bus_dropped_full_total", 0),
        ("shardcast_bus_dropped_disconnected_total", 0),
        ("shardcast_bus_rejected_total", 0),
        ("shardcast_bus_reconnects_total", 0),
        ("shardcast_bus_stall_detected_total", 0),
    ] {
        assert_eq!(metric(&text, series), want as f64, "{series}");
    }
    assert!(
        text.contains("shardcast_bus_round_trip_seconds_bucket"),
        "{text}"
    );
    assert_eq!(
        metric(&text, "shardcast_messages_published_total{source=\"bus\"}"),
        (total - sent(1)) as f64
    );
    drop(all);
    drop((readers, subscribers));
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_three_nodes_deliver_exactly_once_in_order() {
    three_nodes_exact(&Redis::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_three_nodes_deliver_exactly_once_in_order() {
    three_nodes_exact(&RedisCluster::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_three_nodes_deliver_exactly_once_in_order() {
    three_nodes_exact(&Nats::start().await).await;
}

// ---------------------------------------------------------------------------------------
// The broker goes away and comes back

/// Three nodes. `room` has a subscriber on every node, `news` on B and C; `late` is first
/// subscribed (on B and C) while the broker is down. Node A publishes server-side. While
/// the broker is down, A's messages reach A's subscribers only (and are counted as not
/// sent); once it is back, every node has resubscribed every topic it has an interest in
/// within 2 s, as the broker counts them, and the next messages reach everyone exactly
/// once: nothing from the outage is replayed, nothing is duplicated.
async fn broker_restart(broker: &mut impl TestBroker) {
    const M: usize = 100;
    let url = broker.url();
    let nodes = start_nodes(&url, 3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut room = Vec::new();
    for node in &nodes {
        room.push(node.connect("/ws?topic=room").await);
    }
    let mut news = vec![
        b.connect("/ws?topic=news").await,
        c.connect("/ws?topic=news").await,
    ];
    interest_is(broker, "room", 3).await;
    interest_is(broker, "news", 2).await;
    publish_all(a, "room", "a", 0..M).await;
    publish_all(a, "news", "a", 0..M).await;
    for ws in room.iter_mut().chain(&mut news) {
        assert_exactly(&read_to_markers(ws, &["a"]).await, &[("a", 0..M)]);
    }

    broker.kill();
    for node in &nodes {
        // The broker is gone: only the node can say it noticed.
        poll("every node to see the broker gone", || async move {
            !node.relay.bus_connected()
        })
        .await;
    }
    // Local delivery goes on without the broker; new topics can be subscribed meanwhile.
    publish_all(a, "room", "a", M..2 * M).await;
    let local = read_to_markers(&mut room[0], &["a"]).await;
    assert_exactly(&local, &[("a", M..2 * M)]);
    let mut late = vec![
        b.connect("/ws?topic=late").await,
        c.connect("/ws?topic=late").await,
    ];
    stats_until(a, "the outage's messages counted as not sent", |s| {
        s.bus
            .as_ref()
            .is_some_and(|b| b.dropped_disconnected == M as u64 + 1)
    })
    .await;

    broker.restart().await;
    let back = Instant::now();
    for (topic, n) in [("room", 3), ("news", 2), ("late", 2)] {
        interest_is(broker, topic, n).await;
    }
    for node in &nodes {
        connected(node).await;
    }
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "cross-node delivery resumed {took:?} after the broker's return"
    );
    for topic in ["room", "news", "late"] {
        publish_all(a, topic, "a", 2 * M..3 * M).await;
    }
    for ws in room.iter_mut().chain(&mut news).chain(&mut late) {
        let got = read_to_markers(ws, &["a"]).await;
        assert_exactly(&got, &[("a", 2 * M..3 * M)]);
    }
    for node in &nodes {
        let stats = node.relay.stats().await;
        assert!(bus(&stats).reconnects >= 1, "{:?}", stats.bus);
    }
    // B: room and news before the outage, all three after, one marker each; nothing from
    // the outage.
    let stats = b.relay.stats().await;
    assert_eq!(
        bus(&stats).received,
        5 * (M as u64 + 1),
        "the outage's messages never arrive"
    );
    assert_eq!(bus(&stats).subscriptions, 3);
    drop((room, news, late));
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_restart_resumes_within_two_seconds_without_duplicates() {
    broker_restart(&mut Redis::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_restart_resumes_within_two_seconds_without_duplicates() {
    broker_restart(&mut Nats::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_restart_resumes_within_two_seconds_without_duplicates() {
    broker_restart(&mut RedisCluster::start().await).await;
}

// ---------------------------------------------------------------------------------------
// A frozen broker: local delivery never pauses

/// More than the bus queue and the batch in flight hold: with a publisher that waited on a
/// full queue, the last of these would wait for the command timeout (2 s).
const FROZEN_BURST: usize = 6000;

/// The broker stops answering without closing anything (SIGSTOP; every primary of a
/// cluster). Right away node A publishes more messages than the bus queue holds: A's local
/// subscriber gets every one of them within a second, well under the 2 s a hung broker
/// command is given, the bus copies that did not fit are counted in `dropped_full` (Redis),
/// and the stall is detected. Once the broker runs again (SIGCONT) the nodes reconnect,
/// resubscribe, and deliver across nodes exactly once again.
async fn frozen_broker(broker: &impl TestBroker) {
    const M: usize = 50;
    let nodes = start_nodes(&broker.url(), 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let local = a.connect("/ws?topic=room").await;
    let mut remote = b.connect("/ws?topic=room").await;
    interest_is(broker, "room", 2).await;
    let reader = tokio::spawn(async move {
        let mut local = local;
        let got = read_n(&mut local, FROZEN_BURST).await;
        (Instant::now(), got, local)
    });

    broker.signal("-STOP");
    let start = Instant::now();
    let topic = Topic::new("room").expect("topic");
    for i in 0..FROZEN_BURST {
        a.relay
            .publish(&topic, Opcode::Text, format!("s-{i}").as_bytes())
            .await
            .expect("publish");
    }
    let (end, got, mut local) = within("the local subscriber", reader)
        .await
        .expect("reader");
    let took = end - start;
    assert_exactly(&got, &[("s", 0..FROZEN_BURST)]);
    assert!(
        took < Duration::from_secs(1),
        "local delivery paused for the frozen broker: {FROZEN_BURST} messages took {took:?}"
    );
    // On Redis the bus task waits for the frozen broker's answer to its pipeline, the queue
    // fills, and the copies that do not fit are dropped. async-nats answers nothing: it takes
    // the burst into its own write buffer, so there the queue never fills.
    let stats = a.relay.stats().await;
    if broker.url().kind() != shardcast::BusKind::Nats {
        assert!(bus(&stats).dropped_full > 0, "{:?}", stats.bus);
    }
    for node in &nodes {
        stats_until(node, "a stall detected", |s| {
            s.bus.as_ref().is_some_and(|b| b.stall_detected >= 1)
        })
        .await;
    }

    broker.signal("-CONT");
    for node in &nodes {
        stats_until(node, "a new session after the stall", |s| {
            s.bus.as_ref().is_some_and(|b| b.reconnects >= 1)
        })
        .await;
        connected(node).await;
    }
    interest_is(broker, "room", 2).await;
    publish_all(a, "room", "p", 0..M).await;
    assert_exactly(&read_to_markers(&mut local, &["p"]).await, &[("p", 0..M)]);
    // B may get some of the burst that reached the broker before it froze (at most once
    // each, in order); after the stall, every message exactly once.
    let got = read_to_markers(&mut remote, &["p"]).await;
    let (burst, after): (Vec<String>, Vec<String>) =
        got.into_iter().partition(|m| m.starts_with("s-"));
    let seq: Vec<usize> = burst
        .iter()
        .map(|m| m[2..].parse().expect("burst number"))
        .collect();
    assert!(
        seq.windows(2).all(|w| w[0] < w[1]),
        "burst duplicated or reordered"
    );
    assert_exactly(&after, &[("p", 0..M)]);
    let stats = a.relay.stats().await;
    let s = bus(&stats);
    assert_eq!(
        s.published + s.dropped_full + s.dropped_disconnected,
        (FROZEN_BURST + M + 1) as u64,
        "every message published, dropped for a full queue, or dropped for the lost session: {s:?}"
    );
    drop((local, remote));
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_frozen_broker_never_pauses_local_delivery() {
    frozen_broker(&Redis::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_frozen_broker_never_pauses_local_delivery() {
    frozen_broker(&RedisCluster::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_frozen_broker_never_pauses_local_delivery() {
    frozen_broker(&Nats::start().await).await;
}

// ---------------------------------------------------------------------------------------
// Silent stall

/// Node B reaches the broker through a [`Proxy`]; node A directly. The proxy goes silent on
/// B's pub/sub connection (Redis: only the subscriber connection; NATS: its one connection)
/// while it keeps forwarding B's commands: B's publishes still reach A, and B's probe is
/// published fine, but nothing comes back. B detects the stall by its probe, resubscribes
/// over a new connection (which the proxy forwards), and cross-node delivery resumes with
/// nothing duplicated.
async fn silent_stall(broker: &impl TestBroker, port: u16, subscribers_only: bool) {
    const M: usize = 50;
    let proxy = Proxy::start(port).await;
    let direct = broker.url();
    let via_proxy: BusUrl = direct
        .as_str()
        .replace(&format!(":{port}"), &format!(":{}", proxy.port))
        .parse()
        .expect("proxied url");
    let mut c = node_config(&via_proxy);
    if let Some(b) = c.bus.as_mut() {
        b.probe_interval = Duration::from_millis(500);
    }
    let a = start(node_config(&direct)).await;
    let b = start(c).await;
    connected(&a).await;
    connected(&b).await;
    let mut a_sub = a.connect("/ws?topic=room").await;
    let mut b_pub = b.connect("/ws/room").await;
    interest_is(broker, "room", 2).await;

    let gagged = proxy.gag(subscribers_only);
    assert!(gagged >= 1, "no connection to silence");
    // B's connection still takes commands: its messages reach A.
    send_all(&mut b_pub, "b", 0..M).await;
    send_end(&mut b_pub, "b").await;
    assert_exactly(&read_to_markers(&mut a_sub, &["b"]).await, &[("b", 0..M)]);
    assert_exactly(&read_to_markers(&mut b_pub, &["b"]).await, &[("b", 0..M)]);
    stats_until(&b, "the stall detected by the probe", |s| {
        s.bus
            .as_ref()
            .is_some_and(|b| b.stall_detected >= 1 && b.reconnects >= 1)
    })
    .await;
    connected(&b).await;
    // The silenced connection is gone and the new one subscribed.
    interest_is(broker, "room", 2).await;

    publish_all(&a, "room", "a", 0..M).await;
    assert_exactly(&read_to_markers(&mut b_pub, &["a"]).await, &[("a", 0..M)]);
    assert_exactly(&read_to_markers(&mut a_sub, &["a"]).await, &[("a", 0..M)]);
    let stats = a.relay.stats().await;
    assert_eq!(
        bus(&stats).stall_detected,
        0,
        "A, not proxied, saw no stall"
    );
    drop((a_sub, b_pub, proxy));
    stop_all(vec![a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_silent_stall_is_detected_and_recovered() {
    let redis = Redis::start().await;
    silent_stall(&redis, redis.port(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_silent_stall_is_detected_and_recovered() {
    let nats = Nats::start().await;
    silent_stall(&nats, nats.broker.port, false).await;
}

// ---------------------------------------------------------------------------------------
// A node dies

/// Nodes A and B in process, node C a `shardcast serve` process, each with a subscriber of
/// `room`. C is killed with SIGKILL: A's messages still reach B exactly once and in order,
/// and C's subscription disappears from the broker once it notices the closed connection.
async fn node_dies(broker: &impl TestBroker) {
    const M: usize = 100;
    let url = broker.url();
    let nodes = start_nodes(&url, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut c = spawn_node(&url).await;
    let c_addr: SocketAddr = ([127, 0, 0, 1], c.port).into();
    let mut b_sub = b.connect("/ws?topic=room").await;
    let mut c_sub = ws_connect(c_addr, "/ws?topic=room").await;
    let mut a_sub = a.connect("/ws?topic=room").await;
    interest_is(broker, "room", 3).await;
    publish_all(a, "room", "a", 0..M).await;
    for ws in [&mut a_sub, &mut b_sub, &mut c_sub] {
        assert_exactly(&read_to_markers(ws, &["a"]).await, &[("a", 0..M)]);
    }

    c.kill();
    publish_all(a, "room", "a", M..2 * M).await;
    for ws in [&mut a_sub, &mut b_sub] {
        assert_exactly(&read_to_markers(ws, &["a"]).await, &[("a", M..2 * M)]);
    }
    interest_is(broker, "room", 2).await;
    publish_all(a, "room", "a", 2 * M..3 * M).await;
    assert_exactly(
        &read_to_markers(&mut b_sub, &["a"]).await,
        &[("a", 2 * M..3 * M)],
    );
    let stats = b.relay.stats().await;
    assert_eq!(bus(&stats).received, 3 * (M as u64 + 1));
    drop((a_sub, b_sub, c_sub));
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_others_carry_on_when_a_node_dies() {
    node_dies(&Redis::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_others_carry_on_when_a_node_dies() {
    node_dies(&RedisCluster::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_others_carry_on_when_a_node_dies() {
    node_dies(&Nats::start().await).await;
}

// ---------------------------------------------------------------------------------------
// Interest-based subscription

/// A publishes to `hot`; B has a subscriber of `hot`, C only one of `cold`. The broker
/// counts exactly A and B on `hot`, C on `cold`: C is never subscribed to `hot`. B gets
/// every message. When B's subscriber leaves, B unsubscribes (the broker counts only A) and
/// A's next messages reach nobody else.
///
/// Why the final counts are settled: A is subscribed to `hot` itself, and its own copies
/// come back through the broker in order. Once the last one is back (`dropped_own`), the
/// broker has handled every message A sent and handed it to whoever was subscribed then.
async fn interest_only(broker: &impl TestBroker) {
    const M: usize = 200;
    let nodes = start_nodes(&broker.url(), 3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut publisher = a.connect("/ws/hot").await;
    let mut hot = b.connect("/ws?topic=hot").await;
    let cold = c.connect("/ws?topic=cold").await;
    interest_is(broker, "hot", 2).await;
    interest_is(broker, "cold", 1).await;
    assert!(!c.relay.bus_subscribed(&Topic::new("hot").expect("topic")));

    send_all(&mut publisher, "a", 0..M).await;
    send_end(&mut publisher, "a").await;
    assert_exactly(&read_to_markers(&mut hot, &["a"]).await, &[("a", 0..M)]);
    read_to_markers(&mut publisher, &["a"]).await;

    // B's last subscriber leaves: B unsubscribes, A's next messages reach nobody there.
    hot.close(None).await.expect("close");
    drop(hot);
    interest_is(broker, "hot", 1).await;
    send_all(&mut publisher, "a", M..2 * M).await;
    send_end(&mut publisher, "a").await;
    read_to_markers(&mut publisher, &["a"]).await;
    stats_until(a, "A's own copies back from the broker", |s| {
        s.bus
            .as_ref()
            .is_some_and(|b| b.dropped_own == 2 * (M as u64 + 1))
    })
    .await;

    let sb = b.relay.stats().await;
    assert_eq!(
        bus(&sb).received,
        M as u64 + 1,
        "B got hot's traffic after leaving it"
    );
    assert_eq!(bus(&sb).subscriptions, 0);
    let sc = c.relay.stats().await;
    assert_eq!(bus(&sc).received, 0, "C received hot's traffic");
    assert_eq!(bus(&sc).subscriptions, 1);
    drop((publisher, cold));
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_node_without_subscribers_receives_no_traffic() {
    interest_only(&Redis::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_node_without_subscribers_receives_no_traffic() {
    interest_only(&RedisCluster::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_node_without_subscribers_receives_no_traffic() {
    interest_only(&Nats::start().await).await;
}

// ---------------------------------------------------------------------------------------
// Batching and sharded pub/sub, as the broker counts commands

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM mod 16384; no hash tags here).
fn slot(key: &str) -> u16 {
    let mut crc: u16 = 0;
    for b in key.bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// `per_group` topic names for each of `slots`, each group's channels in that one slot.
fn topics_in_slots(slots: &[u16], per_group: usize) -> Vec<Vec<String>> {
    let mut groups = vec![Vec::new(); slots.len()];
    let mut i = 0u64;
    while groups.iter().any(|g| g.len() < per_group) {
        let name = format!("t{i}");
        let s = slot(&channel(shardcast::BusKind::RedisCluster, &name));
        if let Some(g) = slots.iter().position(|&want| want == s)
            && groups[g].len() < per_group
        {
            groups[g].push(name);
        }
        i += 1;
    }
    groups
}

/// Node A's one client subscribes to `topics` in one handshake; node B publishes one
/// message to each. Returns once A's client has them all.
async fn many_topics(nodes: &[TestServer], topics: &[String]) {
    let query: Vec<String> = topics.iter().map(|t| format!("topic={t}")).collect();
    let mut ws = nodes[0].connect(&format!("/ws?{}", query.join("&"))).await;
    for t in topics {
        publish_all(&nodes[1], t, t, 0..0).await;
    }
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let got = read_to_markers(&mut ws, &names).await;
    assert!(got.is_empty(), "{got:?}");
    drop(ws);
}

/// Standalone Redis: 60 topics subscribed at once take fewer `SUBSCRIBE` calls than topics
/// (one multi-channel call per 5 ms batch), and messages go out as `PUBLISH`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_subscribes_in_batches() {
    const N: usize = 60;
    let redis = Redis::start().await;
    let nodes = start_nodes(&redis.url(), 2).await;
    let port = redis.port();
    redis_cmd(port, &["CONFIG", "RESETSTAT"])
        .await
        .expect("CONFIG RESETSTAT");
    let topics: Vec<String> = (0..N).map(|i| format!("t{i}")).collect();
    many_topics(&nodes, &topics).await;
    let stats = commandstats(port).await;
    let subscribes = stats.get("subscribe").copied().unwrap_or(0);
    assert!(
        (1..N as u64).contains(&subscribes),
        "{subscribes} SUBSCRIBE calls for {N} topics: {stats:?}"
    );
    assert!(
        stats.get("publish").copied().unwrap_or(0) >= N as u64,
        "{stats:?}"
    );
    assert_eq!(stats.get("spublish"), None, "{stats:?}");
    stop_all(nodes).await;
}

/// Redis Cluster: topics in three slots, one per primary (redis-cli gives the three
/// primaries equal slot ranges in order). Every primary sees `SPUBLISH` and never
/// `PUBLISH`, so messages stay within their shard; 20 topics of one slot subscribed at once
/// take fewer `SSUBSCRIBE` calls than channels (one multi-channel call per slot and batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_uses_sharded_pubsub_in_batches() {
    const PER_SLOT: usize = 20;
    let cluster = RedisCluster::start().await;
    let nodes = start_nodes(&cluster.url(), 2).await;
    let groups = topics_in_slots(&[100, 8000, 16000], PER_SLOT);
    let keyslot = redis_cmd(
        cluster.ports()[0],
        &[
            "CLUSTER",
            "KEYSLOT",
            &channel(shardcast::BusKind::RedisCluster, &groups[1][0]),
        ],
    )
    .await;
    assert!(matches!(keyslot, Some(Resp::Int(8000))), "{keyslot:?}");
    for port in cluster.ports() {
        redis_cmd(port, &["CONFIG", "RESETSTAT"])
            .await
            .expect("CONFIG RESETSTAT");
    }
    let topics: Vec<String> = groups.concat();
    many_topics(&nodes, &topics).await;
    for port in cluster.ports() {
        let stats = commandstats(port).await;
        let ssubscribes = stats.get("ssubscribe").copied().unwrap_or(0);
        assert!(
            (1..PER_SLOT as u64).contains(&ssubscribes),
            "primary {port}: {ssubscribes} SSUBSCRIBE calls for {PER_SLOT} channels: {stats:?}"
        );
        assert!(
            stats.get("spublish").copied().unwrap_or(0) >= PER_SLOT as u64,
            "primary {port}: {stats:?}"
        );
        assert_eq!(stats.get("publish"), None, "primary {port}: {stats:?}");
        assert_eq!(stats.get("subscribe"), None, "primary {port}: {stats:?}");
    }
    stop_all(nodes).await;
}

/// `shardcast bench fanout` across three nodes: publishers on node A, subscribers spread over
/// A, B and C. Every message reaches every subscriber once and in order, and the report
/// splits the deliveries by node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn bench_fanout_across_three_nodes_loses_nothing() {
    let redis = Redis::start().await;
    let nodes = start_nodes(&redis.url(), 3).await;
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| format!("ws://{}/ws/{{topic}}", n.addr))
        .collect();
    let mut args: Vec<String> = [
        "fanout",
        "--subscribers",
        "30",
        "--topics",
        "2",
        "--publishers",
        "2",
        "--messages",
        "200",
        "--rate",
        "4000",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for u in &urls {
        args.extend(["--url".to_string(), u.clone()]);
    }
    let r = bench_report(args).await;
    let f = r.fanout.as_ref().expect("fanout result");
    assert_eq!(
        (f.published, f.expected, f.lost, f.out_of_order, f.foreign),
        (400, 30 * 200, 0, 0, 0),
        "{f:?}"
    );
    assert_eq!(r.deliveries, 30 * 200);
    let split: Vec<(u64, u64)> = r
        .by_url
        .iter()
        .map(|u| (u.connected, u.measured_deliveries))
        .collect();
    assert_eq!(
        split,
        [(10, 2000), (10, 2000), (10, 2000)],
        "{:?}",
        r.by_url
    );
    stop_all(nodes).await;
}

// ---------------------------------------------------------------------------------------
// No broker at all (runs without any broker installed)

/// A node whose broker is not there serves its own subscribers as if standalone, counts
/// what it could not send, and keeps trying to connect.
#[tokio::test]
async fn without_its_broker_a_node_still_delivers_locally() {
    for scheme in ["redis", "nats"] {
        let url: BusUrl = format!("{scheme}://127.0.0.1:{}", free_port())
            .parse()
            .expect("url");
        let node = start(node_config(&url)).await;
        let mut a = node.connect("/ws/room").await;
        let mut b = node.connect("/ws/room").await;
        send_all(&mut a, "a", 0..10).await;
        send_end(&mut a, "a").await;
        assert_exactly(&read_to_markers(&mut b, &["a"]).await, &[("a", 0..10)]);
        let stats = stats_until(&node, "the unsent messages counted", |s| {
            s.bus.as_ref().is_some_and(|b| b.dropped_disconnected == 11)
        })
        .await;
        let counters = bus(&stats);
        assert!(
            !counters.connected && counters.published == 0 && counters.subscriptions == 0,
            "{counters:?}"
        );
        drop((a, b));
        node.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// Measurement: throughput through the bus and the latency it adds (docs/cluster.md)

/// Two nodes. Throughput: node A publishes `N` messages server-side to a topic whose only
/// subscriber is on node B; messages per second from the first publish to the last receipt.
/// A keeps at most [`WINDOW`] messages in flight (published, not yet received), since a
/// publisher that outruns the broker has its bus copies dropped, not queued. Latency: one
/// subscriber on A and one on B; A publishes one message per millisecond stamped with its
/// send time; percentiles of receipt minus send on each side. Every message must arrive.
/// Prints its figures. In the normal run (CI runs it alongside every other test) the sizes
/// are small; `SHARDCAST_BUS_MEASURE=1` with `--release --nocapture`, alone, gives numbers
/// worth quoting.
async fn measure(name: &str, url: BusUrl) {
    /// Half the bus queue: the queue never fills.
    const WINDOW: usize = 2048;
    let full = std::env::var_os("SHARDCAST_BUS_MEASURE").is_some();
    let (n, samples) = if full { (50_000, 2000) } else { (2000, 200) };
    const LONG: Duration = Duration::from_secs(30);
    let nodes = start_nodes(&url, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);

    let mut sub = b.connect("/ws?topic=tput").await;
    let (seen_tx, mut seen) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            next_data(&mut sub).await;
            got += 1;
            seen_tx.send_replace(got);
        }
        Instant::now()
    });
    let topic = Topic::new("tput").expect("topic");
    // The handshake waited for B's broker subscription (B's session is up).
    let start = Instant::now();
    for i in 0..n {
        if i >= WINDOW {
            let wait = seen.wait_for(|&got| i - got < WINDOW);
            tokio::time::timeout(LONG, wait)
                .await
                .expect("the window to open")
                .expect("reader");
        }
        a.relay
            .publish(&topic, Opcode::Text, format!("{i:064}").as_bytes())
            .await
            .expect("publish");
    }
    let Ok(end) = tokio::time::timeout(LONG, reader).await else {
        let (sa, sb) = (a.relay.stats().await, b.relay.stats().await);
        panic!("not every message arrived:\nA {:?}\nB {:?}", sa.bus, sb.bus);
    };
    let end = end.expect("reader");
    let rate = n as f64 / (end - start).as_secs_f64();

    let local = a.connect("/ws?topic=lat").await;
    let remote = b.connect("/ws?topic=lat").await;
    let base = Instant::now();
    let stamp = move |ws: Ws| {
        tokio::spawn(async move {
            let mut ws = ws;
            let mut lat = Vec::with_capacity(samples);
            while lat.len() < samples {
                let m = next_data(&mut ws).await.into_text().expect("text");
                let sent: u64 = m.parse().expect("stamp");
                lat.push(base.elapsed().as_nanos() as u64 - sent);
            }
            lat.sort_unstable();
            lat
        })
    };
    let (l, r) = (stamp(local), stamp(remote));
    let topic = Topic::new("lat").expect("topic");
    for _ in 0..samples {
        let sent = base.elapsed().as_nanos() as u64;
        a.relay
            .publish(&topic, Opcode::Text, sent.to_string().as_bytes())
            .await
            .expect("publish");
        // The pacing of the latency samples, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let pct = |v: &[u64], p: f64| v[((v.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    let l = tokio::time::timeout(LONG, l)
        .await
        .expect("local")
        .expect("local");
    let r = tokio::time::timeout(LONG, r)
        .await
        .expect("remote")
        .expect("remote");
    let stats = a.relay.stats().await;
    assert_eq!(bus(&stats).dropped_full, 0, "{:?}", stats.bus);
    println!(
        "{name}: {n} messages of 64 B, node A -> node B through the bus: {rate:.0} msg/s; \
         latency publish -> receive, same node p50 {:.0} us p99 {:.0} us, \
         other node p50 {:.0} us p99 {:.0} us",
        pct(&l, 0.5),
        pct(&l, 0.99),
        pct(&r, 0.5),
        pct(&r, 0.99),
    );
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn measure_redis_bus() {
    let redis = Redis::start().await;
    measure("redis", redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn measure_redis_cluster_bus() {
    let cluster = RedisCluster::start().await;
    measure("redis+cluster", cluster.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn measure_nats_bus() {
    let nats = Nats::start().await;
    measure("nats", nats.url()).await;
}

// ---------------------------------------------------------------------------------------
// The handshake waits for the broker subscription

/// A subscriber on node B whose handshake has completed gets a message published on node A
/// right after, even for a topic B had no subscriber of: the 101 waited for B's broker
/// subscription. Twenty fresh topics, no readiness polling in between.
async fn handshake_waits_for_the_bus(url: BusUrl) {
    let nodes = start_nodes(&url, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    for i in 0..20 {
        let mut publisher = a.connect(&format!("/ws/fresh-{i}")).await;
        let mut sub = b.connect(&format!("/ws?topic=fresh-{i}")).await;
        send_text(&mut publisher, &format!("m{i}")).await;
        let got = tokio::time::timeout(WAIT, next_data(&mut sub)).await;
        let Ok(got) = got else {
            let (sa, sb) = (a.relay.stats().await, b.relay.stats().await);
            panic!("m{i} never reached B:\nA {:?}\nB {:?}", sa.bus, sb.bus);
        };
        assert_eq!(got, Message::text(format!("m{i}")));
        drop((publisher, sub));
    }
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_subscriber_gets_messages_published_right_after_its_handshake() {
    handshake_waits_for_the_bus(Redis::start().await.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_subscriber_gets_messages_published_right_after_its_handshake() {
    handshake_waits_for_the_bus(RedisCluster::start().await.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_subscriber_gets_messages_published_right_after_its_handshake() {
    handshake_waits_for_the_bus(Nats::start().await.url()).await;
}

// ---------------------------------------------------------------------------------------
// Passwords

/// The password the brokers of these tests want, and a wrong one.
const PASSWORD: &str = "s3cret-bus";
const WRONG: &str = "not-the-password";
/// An ACL user's password, and a NATS token.
const USER_PASSWORD: &str = "app-s3cret";
const TOKEN: &str = "t0ken-s3cret";
/// What no log line may hold.
const SECRETS: [&str; 4] = [PASSWORD, WRONG, USER_PASSWORD, TOKEN];

/// Two nodes whose `--bus` URL has the broker's password exchange a message on each of
/// `topics` (for a cluster, one topic per primary, so every primary took the password).
/// Then a node with the wrong password, or none, in its URL: see [`secured`].
async fn password(broker: &impl TestBroker, topics: &[String], refused: [(BusUrl, &str); 2]) {
    let refused = refused.map(|(url, why)| (BusConfig::new(url), why));
    secured(&BusConfig::new(broker.url()), topics, &refused).await;
}

/// Two nodes with the bus settings `good` exchange a message on each of `topics`. Then, for
/// each of `refused` (a wrong password, a wrong CA…), a node with those settings: it serves
/// anyway, logs that the bus is unavailable with the reason (`refusal`) and without any
/// secret, keeps retrying with backoff (each attempt ends, none hangs), and reports the bus
/// down in `/metrics`.
async fn secured(good: &BusConfig, topics: &[String], refused: &[(BusConfig, &str)]) {
    let nodes = start_nodes_with(good, 2).await;
    many_topics(&nodes, topics).await;
    stop_all(nodes).await;
    for (bus, refusal) in refused {
        let url = &bus.url;
        let (node, mut log) = spawn_node_logged(bus, "warn,shardcast_server::bus=debug").await;
        let mut lines = log_until(&mut log, "bus unavailable").await;
        let warning = lines.last().expect("the warning").clone();
        assert!(warning.contains(refusal), "{url}: {warning}");
        for _ in 0..2 {
            lines.extend(log_until(&mut log, "bus reconnect attempt failed").await);
        }
        assert!(
            !lines.iter().any(|l| SECRETS.iter().any(|s| l.contains(s))),
            "a secret in the log:\n{}",
            lines.join("\n")
        );
        let metrics = http_get(node.port, "/metrics").await.expect("/metrics");
        assert_eq!(metric(&metrics, "shardcast_bus_connected"), 0.0, "{url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_password_reaches_the_broker() {
    let redis = Redis::start_with(Some(PASSWORD)).await;
    let refused = [
        (redis.url_with(Some(WRONG)), "WRONGPASS"),
        (redis.url_with(None), "NOAUTH"),
    ];
    password(&redis, &["room".into()], refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_password_reaches_every_node() {
    let cluster = RedisCluster::start_with(Some(PASSWORD)).await;
    let refused = [
        (cluster.url_with(Some(WRONG)), "WRONGPASS"),
        (cluster.url_with(None), "NOAUTH"),
    ];
    let topics = topics_in_slots(&[100, 8000, 16000], 1).concat();
    password(&cluster, &topics, refused).await;
}

// ---------------------------------------------------------------------------------------
// TLS and credentials

/// `bus` on `url`, verifying the broker against the CA file `ca`.
fn with_ca(url: BusUrl, ca: &std::path::Path) -> BusConfig {
    BusConfig {
        ca_file: Some(ca.to_path_buf()),
        ..BusConfig::new(url)
    }
}

/// What a node that does not trust the broker's certificate logs (rustls's reason).
const UNTRUSTED: &str = "UnknownIssuer";

/// `rediss://` with an ACL user: the nodes log in as `app` over TLS, verified against the
/// test's CA; a wrong password, or a CA that did not sign the server's certificate, is
/// refused with the reason logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_tls_with_an_acl_user() {
    let certs = Certs::new();
    let other = Certs::new();
    let user = format!(">{USER_PASSWORD}");
    let acl = ["--user", "app", "on", &user, "~*", "&*", "+@all"];
    let redis = Redis::start_opts(Some(PASSWORD), Some(&certs), &acl).await;
    let good = with_ca(redis.url_as(&format!("app:{USER_PASSWORD}")), &certs.ca);
    let refused = [
        (
            with_ca(redis.url_as(&format!("app:{WRONG}")), &certs.ca),
            "WRONGPASS",
        ),
        (
            with_ca(redis.url_as(&format!("app:{USER_PASSWORD}")), &other.ca),
            UNTRUSTED,
        ),
    ];
    secured(&good, &["room".into()], &refused).await;
}

/// `rediss+cluster://` with a password: TLS to the seeds and to every primary the cluster
/// announces (its TLS ports), the cluster bus and replication over TLS too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_tls_reaches_every_primary() {
    let certs = Certs::new();
    let other = Certs::new();
    let cluster = RedisCluster::start_opts(Some(PASSWORD), Some(&certs)).await;
    let good = with_ca(cluster.url(), &certs.ca);
    let refused = [
        (
            with_ca(cluster.url_with(Some(WRONG)), &certs.ca),
            "WRONGPASS",
        ),
        (with_ca(cluster.url(), &other.ca), UNTRUSTED),
    ];
    let topics = topics_in_slots(&[100, 8000, 16000], 1).concat();
    secured(&good, &topics, &refused).await;
}

/// `tls://user:password@`: NATS with TLS required and a user; a wrong password or CA is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_tls_with_a_user_and_password() {
    let certs = Certs::new();
    let other = Certs::new();
    let auth = format!("user: app, password: \"{USER_PASSWORD}\"");
    let nats = Nats::start_secured(Some(&certs), &auth).await;
    let good = with_ca(
        nats.url_as("tls", &format!("app:{USER_PASSWORD}")),
        &certs.ca,
    );
    let refused = [
        (
            with_ca(nats.url_as("tls", &format!("app:{WRONG}")), &certs.ca),
            "authorization violation",
        ),
        (
            with_ca(
                nats.url_as("tls", &format!("app:{USER_PASSWORD}")),
                &other.ca,
            ),
            UNTRUSTED,
        ),
    ];
    secured(&good, &["room".into()], &refused).await;
}

/// `nats://token@` to a server that requires TLS: the client upgrades as the server asks,
/// verified against the CA file; a wrong token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_token_over_tls_the_server_requires() {
    let certs = Certs::new();
    let nats = Nats::start_secured(Some(&certs), &format!("token: \"{TOKEN}\"")).await;
    let good = with_ca(nats.url_as("nats", TOKEN), &certs.ca);
    let refused = [
        (
            with_ca(nats.url_as("nats", WRONG), &certs.ca),
            "authorization violation",
        ),
        (
            with_ca(nats.url_as("nats", ""), &certs.ca),
            "authorization violation",
        ),
    ];
    secured(&good, &["room".into()], &refused).await;
}

// ---------------------------------------------------------------------------------------
// A silent stall of one cluster primary

/// One primary of a 3-node cluster sits behind a [`Proxy`] (it announces the proxy's port,
/// as a node behind a NAT does), so both nodes reach it through it. The proxy goes silent on
/// the pub/sub connections to that primary only: commands still work everywhere, nothing
/// comes back from that one primary. Each node sends a probe to every primary, misses that
/// primary's, and restarts its session within two probe intervals (plus scheduling slack);
/// then messages on topics of every primary flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_silent_stall_of_one_primary_is_detected() {
    const EVERY: Duration = Duration::from_millis(500);
    let cluster = RedisCluster::start().await;
    let proxy = Proxy::start(cluster.ports()[1]).await;
    cluster.announce_port(1, proxy.port).await;
    let bus = BusConfig {
        probe_interval: EVERY,
        ..BusConfig::new(cluster.url())
    };
    let nodes = start_nodes_with(&bus, 2).await;
    let topics = topics_in_slots(&[100, 8000, 16000], 1).concat();
    let query: Vec<String> = topics.iter().map(|t| format!("topic={t}")).collect();
    let mut a_sub = nodes[0].connect(&format!("/ws?{}", query.join("&"))).await;
    for t in &topics {
        interest_is(&cluster, t, 1).await;
    }

    let gagged_at = Instant::now();
    // At least A's pub/sub connection to the primary (one of A's topics lives there); B's
    // carries only B's probe of that primary.
    assert!(proxy.gag(true) >= 1, "no pub/sub connection to silence");
    for node in &nodes {
        stats_until(node, "the stall of one primary detected", |s| {
            s.bus
                .as_ref()
                .is_some_and(|b| b.stall_detected >= 1 && b.reconnects >= 1)
        })
        .await;
    }
    let took = gagged_at.elapsed();
    assert!(
        took <= 2 * EVERY + Duration::from_secs(1),
        "detected after {took:?}, more than two probe intervals"
    );

    for node in &nodes {
        connected(node).await;
    }
    for t in &topics {
        interest_is(&cluster, t, 1).await;
    }
    for t in &topics {
        publish_all(&nodes[1], t, t, 0..5).await;
    }
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let got = read_to_markers(&mut a_sub, &names).await;
    let want: Vec<(&str, Range<usize>)> = names.iter().map(|n| (*n, 0..5)).collect();
    assert_exactly(&got, &want);
    drop((a_sub, proxy));
    stop_all(nodes).await;
}
