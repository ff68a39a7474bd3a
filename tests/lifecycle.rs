//! Connection lifecycle: slow consumers, heartbeats, protocol errors, admission and shutdown.
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
    let s = start(Config { send_queue_bytes: BUDGET, max_message_bytes: SIZE, ..config() }).await;
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
            let Message::Binary(b) = next_data(&mut fast).await else { panic!("binary expected") };
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
        s.relay.publish(&topic, Opcode::Binary, &payload).await.unwrap();
        sent += 1;
        let stats = s.relay.stats().await;
        assert!(stats.peak_client_queued_bytes <= BUDGET, "a queue passed its budget: {stats:?}");
        if dropped_at.is_none() && stats.disconnects.get(DisconnectReason::SlowConsumer) == 1 {
            dropped_at = Some(sent);
        }
        // Keep publishing a little after the drop: the others must not notice it.
        if dropped_at.is_some_and(|at| sent >= at + 100) {
            break;
        }
    }
    assert!(dropped_at.is_some(), "the slow consumer was never dropped: {:?}", s.relay.stats().await);
    payload[..8].copy_from_slice(&u64::MAX.to_be_bytes());
    s.relay.publish(&topic, Opcode::Binary, &payload).await.unwrap();
    let (got, fast) = reader.await.expect("fast client got every message in order");
    assert_eq!(got, sent);

    // The slow client finds, after whatever the kernel buffered, the 4008 close frame.
    assert_eq!(raw_close_code(&mut slow).await, 4008);
    let stats = s.relay.stats().await;
    assert_eq!(stats.disconnects.get(DisconnectReason::SlowConsumer), 1);
    assert_eq!(stats.disconnects.total(), 1);
    assert!(stats.peak_client_queued_bytes <= BUDGET);
    drop(fast);
}
