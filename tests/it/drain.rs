//! The storm-free drain, on paused time: `/readyz` turns 503 at once, clients keep being served
//! for the drain delay, then get 1001 in batches spread over the drain timeout; a second
//! request closes everything at once. Also `/metrics` and the health checks.
use crate::common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use shardcast::{Config, Server, Stop};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 40;
const DELAY: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(10);
/// The bound, in paused virtual time, on awaits that last until the drain is over.
const DRAIN_WAIT: Duration = DELAY.saturating_add(TIMEOUT).saturating_add(WAIT);

/// What every client gets when its turn in the drain comes.
fn going_away() -> Option<(u16, String)> {
    Some((1001, "going away".to_string()))
}

struct Running {
    addr: std::net::SocketAddr,
    relay: shardcast::Relay,
    stop: watch::Sender<Stop>,
    task: JoinHandle<Result<(), shardcast::Error>>,
}

async fn start_controlled(config: Config) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = Server::new(listener, config).expect("valid config");
    let addr = server.local_addr().expect("local addr");
    let relay = server.relay();
    let (stop, rx) = watch::channel(Stop::Run);
    let task = tokio::spawn(server.run_with(rx));
    Running {
        addr,
        relay,
        stop,
        task,
    }
}

/// A GET's (status, text), bounded by [`WAIT`].
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    within_for(
        format_args!("the answer to GET {path}"),
        WAIT,
        raw_http(addr, request.as_bytes()),
    )
    .await
}

/// What a subscriber saw: data messages, when its close frame (or the end) arrived, and the
/// close frame's (code, reason).
type Seen = (usize, Instant, Option<(u16, String)>);

/// Opens `CLIENTS` subscribers of `topic`; each task returns what it saw. Join them with
/// [`joined`], which bounds the wait.
async fn subscribers(addr: std::net::SocketAddr) -> Vec<JoinHandle<Seen>> {
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (mut ws, _) = within(
            "a subscriber's handshake",
            tokio_tungstenite::connect_async(format!("ws://{addr}/ws/drain")),
        )
        .await
        .expect("connect");
        tasks.push(tokio::spawn(async move {
            let mut data = 0;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(_))) => data += 1,
                    Some(Ok(Message::Close(f))) => {
                        let close = f.map(|f| (u16::from(f.code), f.reason.to_string()));
                        return (data, Instant::now(), close);
                    }
                    Some(Ok(_)) => {}
                    _ => return (data, Instant::now(), None),
                }
            }
        }));
    }
    tasks
}

/// A subscriber's result, bounded by the drain's whole length plus [`WAIT`] (virtual time).
async fn joined(task: JoinHandle<Seen>) -> Seen {
    within_for("a subscriber's close", DRAIN_WAIT, task)
        .await
        .expect("subscriber task")
}

/// The server's result, bounded like [`joined`].
async fn server_done(task: JoinHandle<Result<(), shardcast::Error>>) {
    within_for("the server's future", DRAIN_WAIT, task)
        .await
        .expect("server task")
        .expect("server result");
}

/// A server with the test's delay and timeout, and its subscribers.
async fn draining_setup() -> (Running, Vec<JoinHandle<Seen>>) {
    let s = start_controlled(Config {
        drain_delay: DELAY,
        drain_timeout: TIMEOUT,
        ..config()
    })
    .await;
    let subs = subscribers(s.addr).await;
    (s, subs)
}

async fn wait_draining(relay: &shardcast::Relay) {
    for _ in 0..10_000 {
        if relay.is_draining() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the server never started draining");
}

#[tokio::test(start_paused = true)]
async fn sigterm_order_readyz_first_then_closes_spread_over_the_timeout() {
    let (s, subs) = draining_setup().await;
    assert_eq!(get(s.addr, "/readyz").await.0, 200);

    let began = Instant::now();
    s.stop.send(Stop::Drain).expect("server is running");
    wait_draining(&s.relay).await;
    assert_eq!(get(s.addr, "/readyz").await.0, 503);
    assert_eq!(get(s.addr, "/livez").await.0, 200);
    assert_eq!(get(s.addr, "/healthz").await.0, 200);
    let (status, _) = within("the refused upgrade", s.http_upgrade("/ws/drain")).await;
    assert_eq!(status, 503, "no new clients while draining");
    // Open clients are still served during the delay.
    let t = shardcast::Topic::new("drain").expect("topic");
    within(
        "the publish during the delay",
        s.relay.publish(&t, shardcast::Opcode::Text, b"still here"),
    )
    .await
    .expect("publish during the delay");

    let mut times = Vec::new();
    for task in subs {
        let (data, at, close) = joined(task).await;
        assert_eq!(close, going_away());
        assert_eq!(data, 1, "the message published during the delay arrived");
        times.push(at - began);
    }
    times.sort();
    let first = times[0];
    let last = times[CLIENTS - 1];
    assert!(
        first >= DELAY,
        "a client was closed {first:?} in, before the delay"
    );
    assert!(last <= DELAY + TIMEOUT, "the last close came {last:?} in");
    // Spread: the closes span most of the window, and no second holds more than a fifth.
    assert!(
        last - first >= TIMEOUT / 2,
        "closes bunched together: {first:?} to {last:?}"
    );
    for w in times.windows(CLIENTS / 5 + 1) {
        assert!(
            w[CLIENTS / 5] - w[0] >= Duration::from_millis(900),
            "{} closes within {:?}",
            CLIENTS / 5 + 1,
            w[CLIENTS / 5] - w[0]
        );
    }
    // Every client is gone, so the server returns without waiting for the deadline.
    server_done(s.task).await;
    assert!(Instant::now() - began < DELAY + TIMEOUT + Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_second_request_closes_everything_at_once() {
    let (s, subs) = draining_setup().await;
    s.stop.send(Stop::Drain).expect("server is running");
    wait_draining(&s.relay).await;
    // Into the spread phase, then the second signal.
    tokio::time::sleep(DELAY + TIMEOUT / 4).await;
    let now = Instant::now();
    s.stop.send(Stop::Now).expect("server is running");
    let mut early = 0;
    for task in subs {
        let (_, at, close) = joined(task).await;
        assert_eq!(close, going_away());
        if at < now {
            early += 1;
        } else {
            assert!(
                at - now < Duration::from_millis(200),
                "closed {:?} late",
                at - now
            );
        }
    }
    assert!(
        early > 0 && early < CLIENTS,
        "{early} closed before the second signal"
    );
    server_done(s.task).await;
    assert!(Instant::now() - now <= Duration::from_secs(2));
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let s = start(config()).await;
    let mut a = within("a's handshake", s.connect("/ws/m")).await;
    let mut b = within("b's handshake", s.connect("/ws/m")).await;
    within("a's message", send_text(&mut a, "one")).await;
    let one = Message::text("one");
    assert_eq!(within("a's message at b", next_data(&mut b)).await, one);
    assert_eq!(within("a's own message", next_data(&mut a)).await, one);
    assert_eq!(
        within(
            "the publish answer",
            s.post("/publish/m", "text/plain", b"two")
        )
        .await,
        202
    );
    assert_eq!(
        within("the HTTP publish at b", next_data(&mut b)).await,
        Message::text("two")
    );
    assert_eq!(
        within(
            "the unknown path's answer",
            s.http("GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        )
        .await
        .0,
        404
    );
    let (status, text) = within(
        "the /metrics answer",
        s.http("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    for line in [
        "shardcast_connections_opened_total 2",
        "shardcast_messages_published_total{source=\"ws\"} 1",
        "shardcast_messages_published_total{source=\"http\"} 1",
        "shardcast_deliveries_total 4",
        "shardcast_topics 1",
        "shardcast_handshake_rejections_total{reason=\"not_found\"} 1",
        // One observation per publish per interested shard: a and b sit on the two shards.
        "shardcast_publish_fanout_seconds_count 4",
        "shardcast_send_queue_bytes_count 2",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    let sum: u64 = text
        .lines()
        .filter(|l| l.starts_with("shardcast_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(sum, 2, "per-shard connection gauges add up");
    let sent: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("shardcast_bytes_sent_total ")?.parse().ok())
        .expect("bytes sent");
    assert!(sent >= 4 * 5, "four frames of at least 5 bytes, got {sent}");
    drop((a, b));
    within("the server's future", s.stop()).await;
}

#[tokio::test]
async fn a_metrics_listener_takes_metrics_off_the_main_port() {
    let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let metrics_addr = metrics.local_addr().expect("addr");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = Server::new(
        listener,
        Config {
            metrics_listen: Some(metrics_addr),
            ..config()
        },
    )
    .expect("valid config")
    .with_metrics_listener(metrics);
    let addr = server.local_addr().expect("addr");
    let (stop, rx) = watch::channel(Stop::Run);
    let task = tokio::spawn(server.run_with(rx));
    assert_eq!(get(addr, "/metrics").await.0, 404);
    let (status, text) = get(metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("shardcast_deliveries_total 0"), "{text}");
    assert_eq!(get(metrics_addr, "/readyz").await.0, 200);
    assert_eq!(get(metrics_addr, "/ws/x").await.0, 404);
    stop.send(Stop::Drain).expect("running");
    within("the server's future", task)
        .await
        .expect("server task")
        .expect("server result");
}

impl Running {
    async fn http_upgrade(&self, path: &str) -> (u16, String) {
        raw_http(
            self.addr,
            upgrade_request("GET", path, &format!("{KEY}{V13}")).as_bytes(),
        )
        .await
    }
}
