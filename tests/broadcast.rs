//! Fan-out: exact counts and order across shards, opcodes, topic isolation, multi-topic
//! subscribers and HTTP publish.
mod common;

use common::*;
use futures_util::StreamExt;
use shardcast::{Config, Opcode, Topic};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_on_four_shards_get_every_message_in_order() {
    const CLIENTS: usize = 500;
    const MESSAGES: usize = 1000;
    let s = start(Config {
        shards: 4,
        ..config()
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(s.connect("/ws/room").await);
    }
    let publisher = clients.pop().expect("at least one client");
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                for expected in 0..MESSAGES {
                    let msg = next_data(&mut ws).await.into_text().expect("text");
                    assert_eq!(msg.as_str(), expected.to_string(), "out of order or lost");
                }
                ws
            })
        })
        .collect();
    // The publisher is a subscriber too and gets its own messages back, in order.
    let (mut sink, mut stream) = publisher.split();
    let own = tokio::spawn(async move {
        let mut got = 0;
        while got < MESSAGES {
            match stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    assert_eq!(t.as_str(), got.to_string());
                    got += 1;
                }
                Some(Ok(_)) => {}
                other => panic!("publisher stream ended: {other:?}"),
            }
        }
        got
    });
    for i in 0..MESSAGES {
        futures_util::SinkExt::send(&mut sink, Message::text(i.to_string()))
            .await
            .expect("send");
    }
    assert_eq!(own.await.unwrap(), MESSAGES);
    let mut open = Vec::new();
    for r in readers {
        open.push(r.await.expect("reader got everything in order"));
    }
    let stats = s.relay.stats().await;
    assert_eq!(stats.deliveries, (CLIENTS * MESSAGES) as u64);
    assert_eq!(stats.disconnects.total(), 0);
    assert_eq!(stats.connections, CLIENTS);
    drop(open);
}

#[tokio::test]
async fn opcode_is_preserved() {
    let s = start(config()).await;
    let mut a = s.connect("/ws/t").await;
    let mut b = s.connect("/ws/t").await;
    send_text(&mut a, "text").await;
    futures_util::SinkExt::send(&mut a, Message::binary(vec![0u8, 159, 146, 150]))
        .await
        .unwrap();
    assert_eq!(next_data(&mut b).await, Message::text("text"));
    assert_eq!(
        next_data(&mut b).await,
        Message::binary(vec![0u8, 159, 146, 150])
    );
    // HTTP: text/* and application/json give text frames, anything else binary.
    assert_eq!(
        s.post("/publish/t", "application/json", b"{\"a\":1}").await,
        202
    );
    assert_eq!(
        s.post("/publish/t", "text/plain; charset=utf-8", b"plain")
            .await,
        202
    );
    assert_eq!(
        s.post("/publish/t", "application/octet-stream", b"\xff\x00")
            .await,
        202
    );
    assert_eq!(next_data(&mut b).await, Message::text("{\"a\":1}"));
    assert_eq!(next_data(&mut b).await, Message::text("plain"));
    assert_eq!(
        next_data(&mut b).await,
        Message::binary(b"\xff\x00".to_vec())
    );
}

#[tokio::test]
async fn topics_are_isolated() {
    let s = start(config()).await;
    let mut red = s.connect("/ws/red").await;
    let mut blue = s.connect("/ws/blue").await;
    for i in 0..10 {
        send_text(&mut red, &format!("red {i}")).await;
        send_text(&mut blue, &format!("blue {i}")).await;
    }
    for i in 0..10 {
        assert_eq!(next_data(&mut red).await, Message::text(format!("red {i}")));
        assert_eq!(
            next_data(&mut blue).await,
            Message::text(format!("blue {i}"))
        );
    }
    // Nothing else arrived: the next message on each is the marker published after.
    s.relay
        .publish(&Topic::new("red").unwrap(), Opcode::Text, b"end")
        .await
        .unwrap();
    s.relay
        .publish(&Topic::new("blue").unwrap(), Opcode::Text, b"end")
        .await
        .unwrap();
    assert_eq!(next_data(&mut red).await, Message::text("end"));
    assert_eq!(next_data(&mut blue).await, Message::text("end"));
    // A topic nobody subscribes to reaches no shard.
    assert_eq!(
        s.relay
            .publish(&Topic::new("green").unwrap(), Opcode::Text, b"x")
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn multi_topic_subscriber_receives_every_topic_and_may_not_publish() {
    let s = start(config()).await;
    let mut multi = s.connect("/ws?topic=a&topic=b&topic=a").await;
    assert_eq!(s.post("/publish/a", "text/plain", b"from a").await, 202);
    assert_eq!(s.post("/publish/b", "text/plain", b"from b").await, 202);
    assert_eq!(s.post("/publish/c", "text/plain", b"from c").await, 202);
    assert_eq!(s.post("/publish/a", "text/plain", b"a again").await, 202);
    assert_eq!(next_data(&mut multi).await, Message::text("from a"));
    assert_eq!(next_data(&mut multi).await, Message::text("from b"));
    // Named twice, delivered once; topic c never arrives.
    assert_eq!(next_data(&mut multi).await, Message::text("a again"));
    send_text(&mut multi, "may I?").await;
    assert_eq!(close_code(&mut multi).await, Some(1008));
}

#[tokio::test]
async fn client_publish_can_be_disabled() {
    let s = start(Config {
        client_publish: false,
        ..config()
    })
    .await;
    let mut a = s.connect("/ws/t").await;
    assert_eq!(s.post("/publish/t", "text/plain", b"server").await, 202);
    assert_eq!(next_data(&mut a).await, Message::text("server"));
    send_text(&mut a, "client").await;
    assert_eq!(close_code(&mut a).await, Some(1008));
}

#[tokio::test]
async fn http_endpoints_answer_with_the_documented_statuses() {
    let s = start(Config {
        max_message_bytes: 1000,
        send_queue_bytes: 4096,
        ..config()
    })
    .await;
    let (status, text) = s
        .http("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 200);
    assert!(text.ends_with("ok"));
    assert_eq!(
        s.http("GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .0,
        404
    );
    assert_eq!(
        s.post("/publish/bad%20topic", "text/plain", b"x").await,
        400
    );
    assert_eq!(
        s.post(&format!("/publish/{}", "x".repeat(129)), "text/plain", b"x")
            .await,
        400
    );
    assert_eq!(s.post("/publish/t", "text/plain", b"\xff\xfe").await, 400);
    assert_eq!(s.post("/publish/t", "text/plain", &[b'a'; 1000]).await, 202);
    assert_eq!(s.post("/publish/t", "text/plain", &[b'a'; 1001]).await, 413);
    // Server-side publish obeys the same limit.
    let t = Topic::new("t").unwrap();
    let too_big = s.relay.publish(&t, Opcode::Binary, &[0; 1001]).await;
    assert!(matches!(
        too_big,
        Err(shardcast::Error::MessageTooLarge {
            size: 1001,
            max: 1000
        })
    ));
    // Chunked bodies have no Content-Length: the limit applies while reading.
    let chunked = format!(
        "POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n7d0\r\n{}\r\n0\r\n\r\n",
        "b".repeat(2000)
    );
    assert_eq!(s.http(&chunked).await.0, 413);
    assert_eq!(
        s.http("GET /publish/t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .0,
        405
    );
}
