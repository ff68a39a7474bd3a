//! The bus against real brokers: three in-process nodes joined through a standalone Redis, a
//! 3-node Redis Cluster (sharded pub/sub) or a NATS server, each started here on free
//! loopback ports and killed when the test ends. Exact counts, no loss, no duplicates,
//! per-publisher order; a broker killed and restarted; a silent stall; interest-based
//! subscription; and a measurement of the bus's throughput and added latency.
//!
//! Needs `redis-server`, `redis-cli` and `nats-server` on the PATH, so every broker test is
//! ignored by default: `cargo test --test bus -- --include-ignored`. Without a binary a test
//! fails with a message saying what to install; it never passes without a broker. The last
//! test needs no broker: a node whose broker is missing still serves locally.
mod common;

use std::net::TcpStream as StdTcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use shardcast::{BusConfig, BusStats, BusUrl, Config, Topic};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------
// Brokers

/// Finds `bin` on the PATH (or in /usr/sbin, where Debian puts nats-server) or fails the
/// test saying how to get it.
fn need(bin: &str) -> String {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([Path::new("/usr/sbin").to_path_buf()])
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file());
    match found {
        Some(p) => p.display().to_string(),
        None => panic!(
            "{bin} is not installed: the bus tests need real brokers \
             (Debian: apt-get install redis-server nats-server)"
        ),
    }
}

/// A port that was free a moment ago on 127.0.0.1.
/// Never the same one twice in this process: the tests run in parallel, and the kernel may
/// hand a just-released port out again.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().expect("local addr").port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A broker process, killed when dropped (also when the test panics).
struct Broker {
    child: Child,
    port: u16,
    args: Vec<String>,
    bin: String,
}

impl Broker {
    fn spawn(bin: &str, args: Vec<String>, port: u16) -> Self {
        let bin = need(bin);
        let child = Command::new(&bin)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {bin}: {e}"));
        Self {
            child,
            port,
            args,
            bin,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same process again, on the same port.
    fn restart(&mut self) {
        self.kill();
        *self = Broker::spawn(&self.bin, self.args.clone(), self.port);
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `request` to 127.0.0.1:`port` and returns what came back, or `None` if nothing
/// listens or answers within 200 ms.
fn ask(port: u16, request: &[u8]) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = StdTcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    s.write_all(request).ok()?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Polls `ready` every 20 ms for at most [`WAIT`], failing the test naming `what`.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < WAIT,
            "timed out after {WAIT:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn redis_ready(port: u16) -> bool {
    ask(port, b"PING\r\n").is_some_and(|r| r.starts_with("+PONG"))
}

fn redis_args(port: u16, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// What the failure tests do to a broker, whichever it is.
trait TestBroker {
    fn url(&self) -> BusUrl;
    /// Kills every broker process.
    fn kill(&mut self);
    /// Starts them again on the same ports and waits until they serve.
    fn restart(&mut self);
    /// Sends `sig` (`-STOP`, `-CONT`) to every broker process.
    fn signal(&self, sig: &str);
}

struct Redis {
    broker: Broker,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let broker = Broker::spawn("redis-server", redis_args(port, dir.path(), &[]), port);
        wait_for("redis-server to answer PING", || redis_ready(port));
        Self { broker, _dir: dir }
    }
}

impl TestBroker for Redis {
    fn url(&self) -> BusUrl {
        format!("redis://127.0.0.1:{}", self.broker.port)
            .parse()
            .expect("redis url")
    }

    fn kill(&mut self) {
        self.broker.kill();
    }

    fn restart(&mut self) {
        self.broker.restart();
        let port = self.broker.port;
        wait_for("redis-server to answer PING again", || redis_ready(port));
    }

    fn signal(&self, sig: &str) {
        self.broker.signal(sig);
    }
}

struct RedisCluster {
    nodes: Vec<Broker>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cli = need("redis-cli");
        let nodes: Vec<Broker> = (0..3)
            .map(|_| {
                let port = free_port();
                let conf = dir.path().join(format!("nodes-{port}.conf"));
                let conf = conf.display().to_string();
                // The cluster bus defaults to port + 10000, past 65535 for half the
                // ephemeral range: give it a free port of its own (Redis 7's cluster-port).
                let bus_port = free_port().to_string();
                let args = redis_args(
                    port,
                    dir.path(),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                        "--cluster-port",
                        &bus_port,
                    ],
                );
                Broker::spawn("redis-server", args, port)
            })
            .collect();
        for n in &nodes {
            wait_for("a cluster node to answer PING", || redis_ready(n.port));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self { nodes, _dir: dir };
        cluster.wait_ok();
        cluster
    }

    fn wait_ok(&self) {
        for n in &self.nodes {
            wait_for("cluster_state:ok on every node", || {
                ask(n.port, b"CLUSTER INFO\r\n").is_some_and(|r| r.contains("cluster_state:ok"))
            });
        }
    }
}

impl TestBroker for RedisCluster {
    fn url(&self) -> BusUrl {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
            .parse()
            .expect("cluster url")
    }

    fn kill(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }

    /// Restarts every node; each reloads its nodes-PORT.conf, so the cluster forms again.
    fn restart(&mut self) {
        for n in &mut self.nodes {
            n.restart();
        }
        self.wait_ok();
    }

    fn signal(&self, sig: &str) {
        for n in &self.nodes {
            n.signal(sig);
        }
    }
}

struct Nats {
    broker: Broker,
}

impl Nats {
    fn start() -> Self {
        let port = free_port();
        let args = ["-a", "127.0.0.1", "-p", &port.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let broker = Broker::spawn("nats-server", args, port);
        wait_for("nats-server to send INFO", || Self::ready(port));
        Self { broker }
    }

    fn ready(port: u16) -> bool {
        ask(port, b"PING\r\n").is_some_and(|r| r.starts_with("INFO"))
    }
}

impl TestBroker for Nats {
    fn url(&self) -> BusUrl {
        format!("nats://127.0.0.1:{}", self.broker.port)
            .parse()
            .expect("nats url")
    }

    fn kill(&mut self) {
        self.broker.kill();
    }

    fn restart(&mut self) {
        self.broker.restart();
        let port = self.broker.port;
        wait_for("nats-server to send INFO again", || Self::ready(port));
    }

    fn signal(&self, sig: &str) {
        self.broker.signal(sig);
    }
}

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

async fn start_nodes(url: &BusUrl, n: usize) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(start(node_config(url)).await);
    }
    for node in &nodes {
        until("every node's bus to connect", || node.relay.bus_connected()).await;
    }
    nodes
}

fn bus(stats: &shardcast::Stats) -> &BusStats {
    stats
        .bus
        .as_ref()
        .expect("a node started with --bus has bus stats")
}

/// Polls `ready` every 2 ms, for at most [`WAIT`].
async fn until(what: &str, ready: impl Fn() -> bool) {
    within(what, async {
        while !ready() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

async fn subscribed_everywhere(nodes: &[&TestServer], topic: &str) {
    let t = Topic::new(topic).expect("topic");
    for node in nodes {
        until("the bus subscription of every interested node", || {
            node.relay.bus_subscribed(&t)
        })
        .await;
    }
}

/// Stops every node at once. Close the test's clients first: the drain waits for open ones.
async fn stop_all(nodes: Vec<TestServer>) {
    futures_util::future::join_all(nodes.into_iter().map(TestServer::stop)).await;
}

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

/// Fails if a data message arrives within `quiet`: the duplicate check after exact counts.
async fn assert_nothing_more(ws: &mut Ws, quiet: Duration) {
    let more = tokio::time::timeout(quiet, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return format!("{t}"),
                Some(Ok(Message::Binary(b))) => return format!("{b:?}"),
                Some(Ok(_)) => continue,
                other => return format!("{other:?}"),
            }
        }
    })
    .await;
    if let Ok(extra) = more {
        panic!("unexpected message after the exact count: {extra}");
    }
}

/// Checks that `got` holds, for each publisher name, exactly `0..count` in order, and
/// nothing else.
fn assert_each_in_order(got: &[String], publishers: &[String], count: usize) {
    for p in publishers {
        let mine: Vec<&str> = got
            .iter()
            .filter_map(|m| m.strip_prefix(p.as_str()))
            .filter_map(|rest| rest.strip_prefix('-'))
            .collect();
        let want: Vec<String> = (0..count).map(|i| i.to_string()).collect();
        assert_eq!(mine, want, "messages of {p}: lost, duplicated or reordered");
    }
    assert_eq!(
        got.len(),
        publishers.len() * count,
        "unexpected extra messages"
    );
}

async fn send_all(ws: &mut Ws, name: &str, range: std::ops::Range<usize>) {
    for i in range {
        ws.send(Message::text(format!("{name}-{i}")))
            .await
            .expect("publish");
    }
}

// ---------------------------------------------------------------------------------------
// Every bus type: three nodes, every node publishing, exact counts

/// Three nodes; on each, one publisher and two receive-only subscribers of `room`. Each
/// publisher sends `M` messages. Every client gets exactly the 3 × M messages, each
/// publisher's in order, then nothing more; the counters agree.
async fn three_nodes_exact(url: BusUrl) {
    const M: usize = 300;
    let nodes = start_nodes(&url, 3).await;
    let mut publishers = Vec::new();
    let mut subscribers = Vec::new();
    for node in &nodes {
        publishers.push(node.connect("/ws/room").await);
        subscribers.push(node.connect("/ws?topic=room").await);
        subscribers.push(node.connect("/ws?topic=room").await);
    }
    subscribed_everywhere(&nodes.iter().collect::<Vec<_>>(), "room").await;
    let names: Vec<String> = (0..nodes.len()).map(|i| format!("node{i}")).collect();
    let mut readers = publishers;
    // Publish from all three nodes at once; each publisher is also a subscriber.
    let sends = readers.iter_mut().zip(&names).map(|(ws, name)| async move {
        send_all(ws, name, 0..M).await;
    });
    futures_util::future::join_all(sends).await;
    let total = nodes.len() * M;
    let mut all: Vec<&mut Ws> = readers.iter_mut().chain(subscribers.iter_mut()).collect();
    let reads = all.iter_mut().map(|ws| async {
        let got = read_n(ws, total).await;
        assert_each_in_order(&got, &names, M);
        assert_nothing_more(ws, Duration::from_millis(300)).await;
    });
    futures_util::future::join_all(reads).await;
    for node in &nodes {
        let stats = node.relay.stats().await;
        let b = bus(&stats);
        assert_eq!(b.published, M as u64, "{b:?}");
        assert_eq!(b.received, 2 * M as u64, "{b:?}");
        assert_eq!(b.dropped_own, M as u64, "{b:?}");
        assert_eq!(b.dropped_disconnected, 0, "{b:?}");
        assert_eq!(b.rejected, 0, "{b:?}");
        assert_eq!(stats.published_bus, 2 * M as u64);
        assert_eq!(stats.deliveries, 3 * total as u64, "3 clients per node");
        assert_eq!(b.subscriptions, 1);
    }
    drop(all);
    drop((readers, subscribers));
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_three_nodes_deliver_exactly_once_in_order() {
    let redis = Redis::start();
    three_nodes_exact(redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_three_nodes_deliver_exactly_once_in_order() {
    let cluster = RedisCluster::start();
    three_nodes_exact(cluster.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_three_nodes_deliver_exactly_once_in_order() {
    let nats = Nats::start();
    three_nodes_exact(nats.url()).await;
}

// ---------------------------------------------------------------------------------------
// The broker goes away and comes back

/// Three nodes with a subscriber each; node A also publishes. While the broker is down, A's
/// messages reach A's subscribers only (and are counted as dropped for the bus); once it is
/// back, every node is connected and resubscribed within 2 s, and the next messages reach
/// everyone exactly once: nothing from the outage is replayed, nothing is duplicated.
async fn broker_restart(broker: &mut impl TestBroker) {
    let url = broker.url();
    const M: usize = 100;
    let nodes = start_nodes(&url, 3).await;
    let mut publisher = nodes[0].connect("/ws/room").await;
    let mut subs = Vec::new();
    for node in &nodes {
        subs.push(node.connect("/ws?topic=room").await);
    }
    subscribed_everywhere(&nodes.iter().collect::<Vec<_>>(), "room").await;
    let a = vec!["a".to_string()];
    send_all(&mut publisher, "a", 0..M).await;
    for ws in subs.iter_mut().chain([&mut publisher]) {
        assert_each_in_order(&read_n(ws, M).await, &a, M);
    }

    broker.kill();
    for node in &nodes {
        until("every node to see the broker gone", || {
            !node.relay.bus_connected()
        })
        .await;
    }
    // Local delivery goes on without the broker.
    send_all(&mut publisher, "a", M..2 * M).await;
    let local = read_n(&mut subs[0], M).await;
    let want: Vec<String> = (M..2 * M).map(|i| format!("a-{i}")).collect();
    assert_eq!(local, want, "local delivery during the outage");
    read_n(&mut publisher, M).await;
    stats_until(
        &nodes[0],
        "the outage's messages counted as not sent",
        |s| {
            s.bus
                .as_ref()
                .is_some_and(|b| b.dropped_disconnected == M as u64)
        },
    )
    .await;

    broker.restart();
    let back = Instant::now();
    let t = Topic::new("room").expect("topic");
    for node in &nodes {
        until("every node to reconnect and resubscribe", || {
            node.relay.bus_connected() && node.relay.bus_subscribed(&t)
        })
        .await;
    }
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "cross-node delivery resumed {took:?} after the broker's return"
    );
    send_all(&mut publisher, "a", 2 * M..3 * M).await;
    let want: Vec<String> = (2 * M..3 * M).map(|i| format!("a-{i}")).collect();
    for ws in subs.iter_mut().chain([&mut publisher]) {
        assert_eq!(read_n(ws, M).await, want, "after the restart");
        assert_nothing_more(ws, Duration::from_millis(300)).await;
    }
    for node in &nodes {
        let stats = node.relay.stats().await;
        assert!(bus(&stats).reconnects >= 1, "{:?}", stats.bus);
    }
    let stats = nodes[1].relay.stats().await;
    assert_eq!(
        bus(&stats).received,
        2 * M as u64,
        "the outage's messages never arrive"
    );
    drop((publisher, subs));
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_restart_resumes_within_two_seconds_without_duplicates() {
    broker_restart(&mut Redis::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_restart_resumes_within_two_seconds_without_duplicates() {
    broker_restart(&mut Nats::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_restart_resumes_within_two_seconds_without_duplicates() {
    broker_restart(&mut RedisCluster::start()).await;
}

// ---------------------------------------------------------------------------------------
// Silent stall

/// The broker stops answering without closing anything (SIGSTOP; every primary of a
/// cluster). Each node's probe does not come back, the stall is counted, and once the broker
/// runs again (SIGCONT) the nodes reconnect, resubscribe, and deliver exactly once again.
async fn silent_stall(broker: &impl TestBroker) {
    const M: usize = 50;
    let url = broker.url();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let mut c = node_config(&url);
        if let Some(b) = c.bus.as_mut() {
            b.probe_interval = Duration::from_millis(300);
        }
        nodes.push(start(c).await);
    }
    let mut publisher = nodes[0].connect("/ws/room").await;
    let mut sub = nodes[1].connect("/ws?topic=room").await;
    subscribed_everywhere(&[&nodes[0], &nodes[1]], "room").await;

    broker.signal("-STOP");
    for node in &nodes {
        stats_until(node, "a stall detected by the probe", |s| {
            s.bus.as_ref().is_some_and(|b| b.stall_detected >= 1)
        })
        .await;
    }
    broker.signal("-CONT");
    let t = Topic::new("room").expect("topic");
    for node in &nodes {
        until("every node to reconnect after the stall", || {
            node.relay.bus_connected() && node.relay.bus_subscribed(&t)
        })
        .await;
    }
    send_all(&mut publisher, "a", 0..M).await;
    let got = read_n(&mut sub, M).await;
    assert_each_in_order(&got, &["a".to_string()], M);
    assert_nothing_more(&mut sub, Duration::from_millis(300)).await;
    drop((publisher, sub));
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_silent_stall_is_detected_and_recovered() {
    silent_stall(&Redis::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_silent_stall_is_detected_and_recovered() {
    silent_stall(&RedisCluster::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_silent_stall_is_detected_and_recovered() {
    silent_stall(&Nats::start()).await;
}

// ---------------------------------------------------------------------------------------
// Interest-based subscription

/// A publishes to `hot`; B has a subscriber of `hot`, C only one of `cold`. B gets every
/// message; C is never subscribed to `hot` on the broker and receives none of its traffic.
/// When B's subscriber leaves, B unsubscribes and receives no more of it either.
async fn interest_only(url: BusUrl) {
    const M: usize = 200;
    let nodes = start_nodes(&url, 3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut publisher = a.connect("/ws/hot").await;
    let mut hot = b.connect("/ws?topic=hot").await;
    let mut cold = c.connect("/ws?topic=cold").await;
    subscribed_everywhere(&[a, b], "hot").await;
    subscribed_everywhere(&[c], "cold").await;
    let hot_topic = Topic::new("hot").expect("topic");
    assert!(!c.relay.bus_subscribed(&hot_topic));

    send_all(&mut publisher, "a", 0..M).await;
    assert_each_in_order(&read_n(&mut hot, M).await, &["a".to_string()], M);
    read_n(&mut publisher, M).await;

    // B's last subscriber leaves: B unsubscribes, A's next messages reach nobody there.
    hot.close(None).await.expect("close");
    drop(hot);
    until("B to unsubscribe from hot", || {
        !b.relay.bus_subscribed(&hot_topic)
    })
    .await;
    send_all(&mut publisher, "a", M..2 * M).await;
    read_n(&mut publisher, M).await;
    // A marker on `cold` after them, through the same broker connection: once C has it,
    // the broker has handled everything A sent before.
    let cold_topic = Topic::new("cold").expect("topic");
    a.relay
        .publish(&cold_topic, shardcast::Opcode::Text, b"marker")
        .await
        .expect("publish marker");
    assert_eq!(read_n(&mut cold, 1).await, vec!["marker".to_string()]);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let sb = b.relay.stats().await;
    assert_eq!(
        bus(&sb).received,
        M as u64,
        "B got hot's traffic after leaving it"
    );
    let sc = c.relay.stats().await;
    assert_eq!(
        bus(&sc).received,
        1,
        "C received only the marker, never hot's traffic"
    );
    assert_eq!(bus(&sc).subscriptions, 1);
    drop((publisher, cold));
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_node_without_subscribers_receives_no_traffic() {
    let redis = Redis::start();
    interest_only(redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_node_without_subscribers_receives_no_traffic() {
    let cluster = RedisCluster::start();
    interest_only(cluster.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_node_without_subscribers_receives_no_traffic() {
    let nats = Nats::start();
    interest_only(nats.url()).await;
}

/// `shardcast bench fanout` across three nodes: publishers on node A, subscribers spread over
/// A, B and C. Every message reaches every subscriber once and in order, and the report
/// splits the deliveries by node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn bench_fanout_across_three_nodes_loses_nothing() {
    let redis = Redis::start();
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
        assert_each_in_order(&read_n(&mut b, 10).await, &["a".to_string()], 10);
        let stats = stats_until(&node, "the unsent messages counted", |s| {
            s.bus.as_ref().is_some_and(|b| b.dropped_disconnected == 10)
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
/// Latency: one subscriber on A and one on B; A publishes one message per millisecond
/// stamped with its send time; percentiles of receipt minus send on each side.
/// Every message must arrive. Prints its figures. In the normal run (CI runs it alongside
/// every other test) the sizes are small; `SHARDCAST_BUS_MEASURE=1` with `--release
/// --nocapture`, alone, gives numbers worth quoting.
async fn measure(name: &str, url: BusUrl) {
    let full = std::env::var_os("SHARDCAST_BUS_MEASURE").is_some();
    let (n, samples) = if full { (50_000, 2000) } else { (2000, 200) };
    const LONG: Duration = Duration::from_secs(30);
    let nodes = start_nodes(&url, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);

    let mut sub = b.connect("/ws?topic=tput").await;
    subscribed_everywhere(&[b], "tput").await;
    let topic = Topic::new("tput").expect("topic");
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            next_data(&mut sub).await;
            got += 1;
        }
        Instant::now()
    });
    let start = Instant::now();
    for i in 0..n {
        a.relay
            .publish(
                &topic,
                shardcast::Opcode::Text,
                format!("{i:064}").as_bytes(),
            )
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
    subscribed_everywhere(&[a, b], "lat").await;
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
            .publish(&topic, shardcast::Opcode::Text, sent.to_string().as_bytes())
            .await
            .expect("publish");
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
    let redis = Redis::start();
    measure("redis", redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn measure_redis_cluster_bus() {
    let cluster = RedisCluster::start();
    measure("redis+cluster", cluster.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn measure_nats_bus() {
    let nats = Nats::start();
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
    handshake_waits_for_the_bus(Redis::start().url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn redis_cluster_subscriber_gets_messages_published_right_after_its_handshake() {
    handshake_waits_for_the_bus(RedisCluster::start().url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and nats-server"]
async fn nats_subscriber_gets_messages_published_right_after_its_handshake() {
    handshake_waits_for_the_bus(Nats::start().url()).await;
}
