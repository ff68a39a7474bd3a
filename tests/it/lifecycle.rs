//! Connection lifecycle: slow consumers, heartbeats, admission and shutdown. Protocol
//! violations and refused handshakes are in `violations.rs`.
use crate::common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use shardcast::{Config, DisconnectReason, Opcode, RejectReason, Topic};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Short heartbeat settings for the paused-clock tests.
const PING: Duration = Duration::from_millis(200);
const PONG: Duration = Duration::from_millis(100);

fn heartbeat_config() -> Config {
    Config {
        ping_interval: PING,
        pong_timeout: PONG,
        ..config()
    }
}

/// A shard's tick under `c`, as `Shard::new` in `src/shard.rs` derives it: the shortest of the
/// intervals (and the 1 s close grace) over 8, clamped to 1..100 ms. Deadlines fire on ticks.
fn shard_tick(c: &Config) -> Duration {
    let shortest = c
        .ping_interval
        .min(c.pong_timeout)
        .min(c.write_timeout)
        .min(Duration::from_secs(1));
    (shortest / 8).clamp(Duration::from_millis(1), Duration::from_millis(100))
}

/// Slack for the paused clock: it never runs ahead of a deadline, but a timer at the same
/// instant as the event may be polled in either order.
const EPSILON: Duration = Duration::from_millis(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_dropped_and_everyone_else_gets_everything() {
    const BUDGET: usize = 256 * 1024;
    const SIZE: usize = 16 * 1024;
    const MAX_MESSAGES: usize = 4000; // 64 MiB: far past any loopback socket buffers
    let s = start(Config {
        send_queue_bytes: BUDGET,
        max_message_bytes: SIZE,
        ..config()
    })
    .await;
    let topic = Topic::new("firehose").expect("a valid topic");

    // A raw client with a small receive buffer that completes the handshake and never reads
    // until the server has dropped it.
    let tcp = small_buffer_connect(s.addr, "the slow client's connect").await;
    let mut slow = Some(
        within(
            "the slow client's handshake",
            raw_ws_on(tcp, "/ws/firehose"),
        )
        .await,
    );

    // The fast client reads all along and stops at the end marker.
    let mut fast = within("the fast client's handshake", s.connect("/ws/firehose")).await;
    let reader = tokio::spawn(async move {
        let mut got = 0u64;
        loop {
            let Message::Binary(b) =
                within("the fast client's next message", next_data(&mut fast)).await
            else {
                panic!("binary expected")
            };
            let seq = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
            if seq == u64::MAX {
                return (got, fast);
            }
            assert_eq!(seq, got, "lost or reordered");
            got += 1;
        }
    });
    let mut payload = vec![0u8; SIZE];
    let mut sent = 0u64;
    let mut dropped_at = None;
    let mut slow_reader = None;
    while sent < MAX_MESSAGES as u64 {
        payload[..8].copy_from_slice(&sent.to_be_bytes());
        within(
            "a publish",
            s.relay.publish(&topic, Opcode::Binary, &payload),
        )
        .await
        .expect("the relay takes the publish");
        sent += 1;
        let stats = stats_now(&s).await;
        assert!(
            stats.peak_client_queued_bytes <= BUDGET,
            "a queue passed its budget: {stats:?}"
        );
        assert!(
            stats.queued_bytes <= 2 * BUDGET,
            "two clients hold more than their budgets: {stats:?}"
        );
        if dropped_at.is_none() && stats.disconnects.get(DisconnectReason::SlowConsumer) == 1 {
            dropped_at = Some(sent);
            // Dropped: now the slow client reads what the kernel buffered for it, so the close
            // frame can still be written within the server's one-second close grace.
            let mut sock = slow.take().expect("the slow client is read once");
            slow_reader = Some(tokio::spawn(async move {
                let mut seen = 0u64;
                while let Some((op, p)) = read_server_frame(&mut sock).await {
                    match op {
                        0x2 => {
                            let seq = u64::from_be_bytes(p[..8].try_into().expect("8 bytes"));
                            assert_eq!(seq, seen, "the slow client's frames out of order");
                            seen += 1;
                        }
                        0x8 => {
                            let code = u16::from_be_bytes([p[0], p[1]]);
                            let reason = String::from_utf8_lossy(&p[2..]).to_string();
                            return (seen, Some((code, reason)));
                        }
                        other => panic!("unexpected opcode {other:#x} at the slow client"),
                    }
                }
                (seen, None)
            }));
        }
        // Keep publishing a little after the drop: the others must not notice it.
        if dropped_at.is_some_and(|at| sent >= at + 100) {
            break;
        }
    }
    assert!(
        dropped_at.is_some(),
        "the slow consumer was never dropped: {:?}",
        stats_now(&s).await
    );
    payload[..8].copy_from_slice(&u64::MAX.to_be_bytes());
    within(
        "the end marker's publish",
        s.relay.publish(&topic, Opcode::Binary, &payload),
    )
    .await
    .expect("the relay takes the publish");
    let (got, fast) = within("the fast client's reader", reader)
        .await
        .expect("fast client got every message in order");
    assert_eq!(got, sent);

    // The slow client finds, after whatever the kernel buffered, the 4008 close frame, or, if
    // the close grace ran out before it could be written, the end of the connection.
    let (seen, close) = within(
        "the slow client's close",
        slow_reader.expect("started at the drop"),
    )
    .await
    .expect("the slow client's reader");
    assert!(seen < sent, "the slow client got everything: {seen}");
    if let Some(close) = close {
        assert_eq!(close, (4008, "slow consumer".to_string()));
    }
    // Its socket and queue are freed: only the fast client, with nothing queued, is left.
    let stats = stats_until(&s, "the slow client freed", |st| {
        st.connections == 1 && st.queued_bytes == 0
    })
    .await;
    assert_eq!(stats.disconnects.get(DisconnectReason::SlowConsumer), 1);
    assert_eq!(stats.disconnects.total(), 1);
    assert!(stats.peak_client_queued_bytes <= BUDGET);
    drop(fast);
}

/// With a paused clock the runtime jumps to the next timer whenever every task waits, so the
/// deadline arithmetic is exact to a shard tick and nothing sleeps for real. A frame the
/// server writes is seen by the client at most one tick later: the clock may jump to the
/// next tick while the bytes cross loopback.
#[tokio::test(start_paused = true)]
async fn client_that_never_answers_pings_is_closed_with_4012() {
    let config = heartbeat_config();
    let tick = shard_tick(&config);
    let s = start(config).await;
    let mut silent = within("the silent client's handshake", raw_ws(s.addr, "/ws/hb")).await;
    let t0 = Instant::now();
    // The first frame is the server's ping, one interval after the handshake.
    let (op, payload) = within("the server's ping", read_server_frame(&mut silent))
        .await
        .expect("ping");
    assert_eq!((op, payload.len()), (0x9, 0));
    let pinged = t0.elapsed();
    assert!(
        pinged + tick >= PING && pinged <= PING + tick + EPSILON,
        "pinged after {pinged:?} (tick {tick:?})"
    );
    let close = within("the 4012 close", raw_close_frame(&mut silent)).await;
    assert_eq!(close, Some((4012, "pong timeout".to_string())));
    let closed = t0.elapsed();
    assert!(
        closed - pinged + tick >= PONG,
        "closed {:?} after the ping",
        closed - pinged
    );
    assert!(
        closed + tick >= PING + PONG,
        "closed too early: {closed:?} (tick {tick:?})"
    );
    assert!(
        closed <= PING + PONG + tick + EPSILON,
        "closed too late: {closed:?} (tick {tick:?})"
    );
    let stats = stats_until(&s, "the silent client freed", |st| st.connections == 0).await;
    assert_eq!(stats.disconnects.get(DisconnectReason::PongTimeout), 1);
    assert_eq!(stats.disconnects.total(), 1);
}

#[tokio::test(start_paused = true)]
async fn client_that_answers_pings_stays_connected() {
    let s = start(heartbeat_config()).await;
    let mut ws = within("the handshake", s.connect("/ws/hb")).await;
    let t0 = Instant::now();
    // tungstenite answers each ping with a pong while we read. Ten intervals later we are
    // still subscribed.
    let mut pings = 0;
    while pings < 10 {
        match within("the server's ping", ws.next()).await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(t0.elapsed() >= PING * 10);
    within(
        "the publish",
        s.relay.publish(
            &Topic::new("hb").expect("a valid topic"),
            Opcode::Text,
            b"still here",
        ),
    )
    .await
    .expect("the relay takes the publish");
    assert_eq!(
        within("the message after ten pings", next_data(&mut ws)).await,
        Message::text("still here")
    );
    assert_eq!(stats_now(&s).await.disconnects.total(), 0);
}

/// Any frame from the client counts as life: a client that never sends a pong, but sends a
/// data message or a ping of its own after each server ping, is never closed with 4012.
#[tokio::test(start_paused = true)]
async fn any_frame_from_the_client_counts_as_life() {
    const ROUNDS: usize = 10;
    let s = start(heartbeat_config()).await;
    let mut c = within("the client's handshake", raw_ws(s.addr, "/ws/life")).await;
    let t0 = Instant::now();
    let (mut echoes, mut pongs) = (0, 0);
    // One more ping than rounds: the last one shows the last round's deadline passed too.
    for round in 0..=ROUNDS {
        // Wait for the server's ping; on the way, the answers to the previous round arrive.
        loop {
            let frame = within("the server's ping", read_server_frame(&mut c)).await;
            match frame.expect("the connection stays open") {
                (0x9, _) => break,
                (0x1, text) => {
                    assert_eq!(text, format!("life {}", 2 * echoes).into_bytes());
                    echoes += 1;
                }
                (0xA, payload) => {
                    assert_eq!(payload, b"me too");
                    pongs += 1;
                }
                (0x8, p) => panic!("closed in round {round}: {:?}", String::from_utf8_lossy(&p)),
                other => panic!("unexpected frame {other:?}"),
            }
        }
        if round == ROUNDS {
            break;
        }
        // Anything but a pong: a data message (echoed to us, a subscriber) or our own ping.
        let frame = if round % 2 == 0 {
            client_frame(true, OP_TEXT, format!("life {round}").as_bytes())
        } else {
            client_frame(true, OP_PING, b"me too")
        };
        within("the client's frame", raw_send(&mut c, &frame)).await;
    }
    assert!(t0.elapsed() >= PING * ROUNDS as u32);
    assert_eq!((echoes, pongs), (ROUNDS / 2, ROUNDS / 2));
    let stats = stats_now(&s).await;
    assert_eq!(stats.disconnects.get(DisconnectReason::PongTimeout), 0);
    assert_eq!((stats.connections, stats.disconnects.total()), (1, 0));
}

#[tokio::test]
async fn client_ping_gets_a_pong() {
    let s = start(config()).await;
    let mut ws = within("the handshake", s.connect("/ws/p")).await;
    within(
        "the client's ping",
        ws.send(Message::Ping(b"are you there".to_vec().into())),
    )
    .await
    .expect("the server takes it");
    loop {
        match within("the pong", ws.next()).await {
            Some(Ok(Message::Pong(p))) => {
                assert_eq!(&p[..], b"are you there");
                break;
            }
            Some(Ok(Message::Ping(_))) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

// Paused time: the drain spreads its closes over the drain timeout.
#[tokio::test(start_paused = true)]
async fn shutdown_sends_1001_to_every_client_and_completes() {
    let s = start(Config {
        shards: 3,
        ..config()
    })
    .await;
    let going_away = || Some((1001, "going away".to_string()));
    let mut readers = Vec::new();
    for i in 0..30 {
        let mut ws = within(
            "a client's handshake",
            s.connect(&format!("/ws/t{}", i % 4)),
        )
        .await;
        readers.push(tokio::spawn(async move { close_frame(&mut ws).await }));
    }
    let mut raw = within("the raw client's handshake", raw_ws(s.addr, "/ws/t0")).await;
    // The raw client answers nothing; it reads the close frame and hangs up.
    readers.push(tokio::spawn(async move { raw_close_frame(&mut raw).await }));
    let (_, text) = within(
        "the /healthz answer",
        s.http("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(text.ends_with("ok"));
    // Returns once the server's future has completed; the drain takes at most its timeout.
    within("the server's future", s.stop()).await;
    for r in readers {
        let close = within("a client's close frame", r)
            .await
            .expect("the reading task does not panic");
        assert_eq!(close, going_away());
    }
}

#[tokio::test]
async fn upgrades_over_the_connection_limit_get_503() {
    let s = start(Config {
        max_connections: 2,
        ..config()
    })
    .await;
    let mut a = within("a's handshake", s.connect("/ws/x")).await;
    let mut b = within("b's handshake", s.connect("/ws/x")).await;
    let req = upgrade_request("GET", "/ws/x", &format!("{KEY}{V13}"));
    assert_eq!(within("the refused upgrade", s.http(&req)).await.0, 503);
    // The refused request took no slot, and was counted once.
    let stats = stats_now(&s).await;
    assert_eq!((stats.connections, stats.disconnects.total()), (2, 0));
    assert_eq!(stats.rejections.get(RejectReason::ConnectionLimit), 1);
    assert_eq!(stats.rejections.total(), 1);

    // A client leaves: once the server has freed it, its slot takes a new upgrade.
    within("a's close", a.close(None)).await.expect("close");
    while within("a's close echo", a.next()).await.is_some() {}
    stats_until(&s, "a's slot freed", |st| st.connections == 1).await;
    let mut c = within("c's handshake", s.connect("/ws/x")).await;
    within("c's message", send_text(&mut c, "in again")).await;
    assert_eq!(
        within("c's message at b", next_data(&mut b)).await,
        Message::text("in again")
    );
    assert_eq!(
        within("c's own message", next_data(&mut c)).await,
        Message::text("in again")
    );
    let stats = stats_now(&s).await;
    assert_eq!(stats.connections, 2);
    assert_eq!(stats.rejections.get(RejectReason::ConnectionLimit), 1);
    assert_eq!(stats.disconnects.get(DisconnectReason::ClientClose), 1);
}

#[tokio::test(start_paused = true)]
async fn a_write_that_makes_no_progress_drops_the_client_after_the_write_timeout() {
    let write_timeout = Duration::from_secs(10);
    let s = start(Config {
        write_timeout,
        send_queue_bytes: 64 << 20, // big enough that it is never a slow consumer
        max_message_bytes: 16 * 1024,
        ..config()
    })
    .await;
    let tcp = small_buffer_connect(s.addr, "the stuck client's connect").await;
    let _stuck = within("the stuck client's handshake", raw_ws_on(tcp, "/ws/stuck")).await;
    let topic = Topic::new("stuck").expect("a valid topic");
    for _ in 0..1024 {
        within(
            "a publish",
            s.relay.publish(&topic, Opcode::Binary, &[1; 16 * 1024]),
        )
        .await
        .expect("the relay takes the publish");
    }
    let queued = stats_now(&s).await.queued_bytes;
    assert!(
        queued > 0,
        "the kernel took 16 MiB: the socket never blocked"
    );
    // Virtual time: the clock jumps while every task waits.
    tokio::time::sleep(write_timeout / 2).await;
    assert_eq!(
        stats_now(&s).await.disconnects.total(),
        0,
        "dropped too early"
    );
    tokio::time::sleep(write_timeout).await;
    let stats = stats_now(&s).await;
    assert_eq!(stats.disconnects.get(DisconnectReason::WriteTimeout), 1);
    assert_eq!(
        (stats.connections, stats.queued_bytes),
        (0, 0),
        "queue and socket freed"
    );
}
