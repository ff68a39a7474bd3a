//! Connection lifecycle: slow consumers, heartbeats, admission and shutdown. Protocol
//! violations and refused handshakes are in `violations.rs`.
mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use shardcast::{Config, DisconnectReason, Opcode, Topic};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

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
    let topic = Topic::new("firehose").unwrap();

    // A raw client with a small receive buffer that completes the handshake and never reads.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut slow = raw_ws_on(sock.connect(s.addr).await.unwrap(), "/ws/firehose").await;

    // The fast client reads all along and stops at the end marker.
    let mut fast = s.connect("/ws/firehose").await;
    let reader = tokio::spawn(async move {
        let mut got = 0u64;
        loop {
            let Message::Binary(b) = next_data(&mut fast).await else {
                panic!("binary expected")
            };
            let seq = u64::from_be_bytes(b[..8].try_into().unwrap());
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
    while sent < MAX_MESSAGES as u64 {
        payload[..8].copy_from_slice(&sent.to_be_bytes());
        s.relay
            .publish(&topic, Opcode::Binary, &payload)
            .await
            .unwrap();
        sent += 1;
        let stats = s.relay.stats().await;
        assert!(
            stats.peak_client_queued_bytes <= BUDGET,
            "a queue passed its budget: {stats:?}"
        );
        if dropped_at.is_none() && stats.disconnects.get(DisconnectReason::SlowConsumer) == 1 {
            dropped_at = Some(sent);
        }
        // Keep publishing a little after the drop: the others must not notice it.
        if dropped_at.is_some_and(|at| sent >= at + 100) {
            break;
        }
    }
    assert!(
        dropped_at.is_some(),
        "the slow consumer was never dropped: {:?}",
        s.relay.stats().await
    );
    payload[..8].copy_from_slice(&u64::MAX.to_be_bytes());
    s.relay
        .publish(&topic, Opcode::Binary, &payload)
        .await
        .unwrap();
    let (got, fast) = reader
        .await
        .expect("fast client got every message in order");
    assert_eq!(got, sent);

    // The slow client finds, after whatever the kernel buffered, the 4008 close frame.
    assert_eq!(raw_close_code(&mut slow).await, 4008);
    let stats = s.relay.stats().await;
    assert_eq!(stats.disconnects.get(DisconnectReason::SlowConsumer), 1);
    assert_eq!(stats.disconnects.total(), 1);
    assert!(stats.peak_client_queued_bytes <= BUDGET);
    drop(fast);
}

/// With a paused clock the runtime jumps to the next timer whenever every task waits, so the
/// deadline arithmetic is exact and nothing sleeps for real.
#[tokio::test(start_paused = true)]
async fn client_that_never_answers_pings_is_closed_with_4012() {
    let ping = Duration::from_secs(20);
    let pong = Duration::from_secs(10);
    let s = start(Config {
        ping_interval: ping,
        pong_timeout: pong,
        ..config()
    })
    .await;
    let mut silent = raw_ws(s.addr, "/ws/hb").await;
    let t0 = tokio::time::Instant::now();
    // The first frame is the server's ping, one interval after the handshake.
    let (op, payload) = read_server_frame(&mut silent).await.expect("ping");
    assert_eq!((op, payload.len()), (0x9, 0));
    let pinged = t0.elapsed();
    assert!(
        pinged >= ping && pinged <= ping + Duration::from_secs(1),
        "pinged after {pinged:?}"
    );
    assert_eq!(raw_close_code(&mut silent).await, 4012);
    let closed = t0.elapsed();
    assert!(closed >= ping + pong, "closed too early: {closed:?}");
    assert!(
        closed <= ping + pong + Duration::from_secs(1),
        "closed too late: {closed:?}"
    );
    let stats = s.relay.stats().await;
    assert_eq!(stats.disconnects.get(DisconnectReason::PongTimeout), 1);
}

#[tokio::test(start_paused = true)]
async fn client_that_answers_pings_stays_connected() {
    let s = start(Config {
        ping_interval: Duration::from_secs(20),
        pong_timeout: Duration::from_secs(10),
        ..config()
    })
    .await;
    let mut ws = s.connect("/ws/hb").await;
    let t0 = tokio::time::Instant::now();
    // tungstenite answers each ping with a pong while we read. Ten intervals later we are
    // still subscribed.
    let mut pings = 0;
    while pings < 10 {
        match ws.next().await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(t0.elapsed() >= Duration::from_secs(200));
    s.relay
        .publish(&Topic::new("hb").unwrap(), Opcode::Text, b"still here")
        .await
        .unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("still here"));
    assert_eq!(s.relay.stats().await.disconnects.total(), 0);
}

#[tokio::test]
async fn client_ping_gets_a_pong() {
    let s = start(config()).await;
    let mut ws = s.connect("/ws/p").await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    loop {
        match ws.next().await {
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
    let mut readers = Vec::new();
    for i in 0..30 {
        let mut ws = s.connect(&format!("/ws/t{}", i % 4)).await;
        readers.push(tokio::spawn(async move { close_code(&mut ws).await }));
    }
    let mut raw = raw_ws(s.addr, "/ws/t0").await;
    // The raw client answers nothing; it reads the close frame and hangs up.
    readers.push(tokio::spawn(
        async move { Some(raw_close_code(&mut raw).await) },
    ));
    let (_, text) = s
        .http("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert!(text.ends_with("ok"));
    s.stop().await; // returns once the server's future has completed
    for r in readers {
        assert_eq!(r.await.unwrap(), Some(1001));
    }
}

#[tokio::test]
async fn upgrades_over_the_connection_limit_get_503() {
    let s = start(Config {
        max_connections: 2,
        ..config()
    })
    .await;
    let a = s.connect("/ws/x").await;
    let _b = s.connect("/ws/x").await;
    let req = "GET /ws/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(s.http(req).await.0, 503);
    // The refused request took no slot.
    let stats = s.relay.stats().await;
    assert_eq!((stats.connections, stats.disconnects.total()), (2, 0));
    drop(a);
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
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let _stuck = raw_ws_on(sock.connect(s.addr).await.unwrap(), "/ws/stuck").await;
    let topic = Topic::new("stuck").unwrap();
    for _ in 0..1024 {
        s.relay
            .publish(&topic, Opcode::Binary, &[1; 16 * 1024])
            .await
            .unwrap();
    }
    let queued = s.relay.stats().await.queued_bytes;
    assert!(
        queued > 0,
        "the kernel took 16 MiB: the socket never blocked"
    );
    // Virtual time: the clock jumps while every task waits.
    tokio::time::sleep(write_timeout / 2).await;
    assert_eq!(
        s.relay.stats().await.disconnects.total(),
        0,
        "dropped too early"
    );
    tokio::time::sleep(write_timeout).await;
    let stats = s.relay.stats().await;
    assert_eq!(stats.disconnects.get(DisconnectReason::WriteTimeout), 1);
    assert_eq!(
        (stats.connections, stats.queued_bytes),
        (0, 0),
        "queue and socket freed"
    );
}
