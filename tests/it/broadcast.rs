//! Fan-out: exact counts and order across shards, opcodes, topic isolation, multi-topic
//! subscribers and HTTP publish.
use crate::common;

use common::*;
use futures_util::StreamExt;
use shardcast::{Config, Opcode, Topic};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_on_four_shards_get_every_message_in_order() {
    const CLIENTS: usize = 500;
    const SHARDS: usize = 4;
    const MESSAGES: usize = 1000;
    let s = start(Config {
        shards: SHARDS,
        ..config()
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(within("a client's handshake", s.connect("/ws/room")).await);
    }
    // New connections go round robin over the shards.
    let stats = stats_now(&s).await;
    assert_eq!(
        stats.shard_connections,
        vec![CLIENTS / SHARDS; SHARDS],
        "clients per shard"
    );
    let publisher = clients.pop().expect("at least one client");
    let readers = readers_in_order(clients, MESSAGES);
    // The publisher is a subscriber too and gets its own messages back, in order.
    let (mut sink, mut stream) = publisher.split();
    let own = tokio::spawn(async move {
        let mut got = 0;
        while got < MESSAGES {
            match within("the publisher's own message", stream.next()).await {
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
        within(
            "the publisher's send",
            futures_util::SinkExt::send(&mut sink, Message::text(i.to_string())),
        )
        .await
        .expect("send");
    }
    assert_eq!(
        within("the publisher's reader", own)
            .await
            .expect("the publisher's reader does not panic"),
        MESSAGES
    );
    let mut open = Vec::new();
    for r in readers {
        open.push(
            within("a reader to finish", r)
                .await
                .expect("reader got everything in order"),
        );
    }
    let stats = stats_now(&s).await;
    assert_eq!(stats.deliveries, (CLIENTS * MESSAGES) as u64);
    assert_eq!(stats.disconnects.total(), 0);
    assert_eq!(stats.connections, CLIENTS);
    assert_eq!(stats.shard_connections, vec![CLIENTS / SHARDS; SHARDS]);
    drop(open);
}

/// One shard, several flush slices of subscribers, and a publisher that sends again as soon as
/// its own copy arrives: the shard takes new publishes between slices of a flush round
/// (`Shard::flush_round`), so frames join some queues mid-round and others in the next round. Every subscriber still gets every
/// message exactly once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_taken_mid_round_keep_every_subscriber_in_order() {
    const CLIENTS: usize = 1200; // more than four flush slices of 256
    const MESSAGES: usize = 300;
    let s = start(Config {
        shards: 1,
        ..config()
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(within("a client's handshake", s.connect("/ws/slices")).await);
    }
    // The first client is flushed first in each round (a round writes clients in the order
    // they subscribed), so when it publishes as soon as its own copy of the previous message
    // arrives, the next message reaches the shard while the round is still writing the rest.
    let mut publisher = clients.remove(0);
    // The other clients read only after the last publish (their frames wait in the kernel's
    // buffers), so the publisher's round trip is not held up behind a thousand reader tasks.
    for i in 0..MESSAGES {
        within("a publish", send_text(&mut publisher, &i.to_string())).await;
        let own = within("the publisher's own copy", next_data(&mut publisher))
            .await
            .into_text()
            .expect("a text frame");
        assert_eq!(own.as_str(), i.to_string());
    }
    let readers = readers_in_order(clients, MESSAGES);
    let mut open = Vec::new();
    for r in readers {
        open.push(
            within("a reader", r)
                .await
                .expect("reader got everything in order"),
        );
    }
    let stats = stats_now(&s).await;
    assert_eq!(stats.deliveries, (CLIENTS * MESSAGES) as u64);
    assert_eq!(stats.disconnects.total(), 0);
    drop(open);
}

#[tokio::test]
async fn opcode_is_preserved() {
    let s = start(config()).await;
    let mut a = within("a's handshake", s.connect("/ws/t")).await;
    let mut b = within("b's handshake", s.connect("/ws/t")).await;
    within("a's text", send_text(&mut a, "text")).await;
    within(
        "a's binary",
        futures_util::SinkExt::send(&mut a, Message::binary(vec![0u8, 159, 146, 150])),
    )
    .await
    .expect("the server takes it");
    expect_next(&mut b, "the text at b", Message::text("text")).await;
    expect_next(
        &mut b,
        "the binary at b",
        Message::binary(vec![0u8, 159, 146, 150]),
    )
    .await;
    // HTTP: text/* and application/json give text frames, anything else binary.
    for (content_type, body) in [
        ("application/json", &b"{\"a\":1}"[..]),
        ("text/plain; charset=utf-8", b"plain"),
        ("application/octet-stream", b"\xff\x00"),
    ] {
        assert_eq!(
            within(
                "the publish answer",
                s.post("/publish/t", content_type, body)
            )
            .await,
            202,
            "{content_type}"
        );
    }
    expect_next(&mut b, "the JSON publish at b", Message::text("{\"a\":1}")).await;
    expect_next(
        &mut b,
        "the text/plain publish at b",
        Message::text("plain"),
    )
    .await;
    expect_next(
        &mut b,
        "the octet-stream publish at b",
        Message::binary(b"\xff\x00".to_vec()),
    )
    .await;
}

#[tokio::test]
async fn topics_are_isolated() {
    let s = start(config()).await;
    let mut red = within("red's handshake", s.connect("/ws/red")).await;
    let mut blue = within("blue's handshake", s.connect("/ws/blue")).await;
    for i in 0..10 {
        within("red's send", send_text(&mut red, &format!("red {i}"))).await;
        within("blue's send", send_text(&mut blue, &format!("blue {i}"))).await;
    }
    for i in 0..10 {
        assert_eq!(
            within("red's own message", next_data(&mut red)).await,
            Message::text(format!("red {i}"))
        );
        assert_eq!(
            within("blue's own message", next_data(&mut blue)).await,
            Message::text(format!("blue {i}"))
        );
    }
    // Nothing else arrived: the next message on each is the marker published after.
    for t in ["red", "blue"] {
        within(
            "the marker's publish",
            s.relay
                .publish(&Topic::new(t).expect("a valid topic"), Opcode::Text, b"end"),
        )
        .await
        .expect("the relay takes the publish");
    }
    expect_next(&mut red, "red's marker", Message::text("end")).await;
    expect_next(&mut blue, "blue's marker", Message::text("end")).await;
    // A topic nobody subscribes to reaches no shard.
    assert_eq!(
        within(
            "the publish to green",
            s.relay.publish(
                &Topic::new("green").expect("a valid topic"),
                Opcode::Text,
                b"x"
            )
        )
        .await
        .expect("the relay takes the publish"),
        0
    );
}

#[tokio::test]
async fn multi_topic_subscriber_receives_every_topic_and_may_not_publish() {
    let s = start(config()).await;
    let mut multi = within(
        "the multi-topic handshake",
        s.connect("/ws?topic=a&topic=b&topic=a"),
    )
    .await;
    for (path, body) in [
        ("/publish/a", &b"from a"[..]),
        ("/publish/b", b"from b"),
        ("/publish/c", b"from c"),
        ("/publish/a", b"a again"),
    ] {
        assert_eq!(
            within("the publish answer", s.post(path, "text/plain", body)).await,
            202,
            "{path}"
        );
    }
    expect_next(&mut multi, "the message to a", Message::text("from a")).await;
    expect_next(&mut multi, "the message to b", Message::text("from b")).await;
    // Named twice, delivered once; topic c never arrives.
    expect_next(
        &mut multi,
        "the second message to a",
        Message::text("a again"),
    )
    .await;
    within("the refused publish", send_text(&mut multi, "may I?")).await;
    assert_eq!(
        within("the 1008 close", close_frame(&mut multi)).await,
        Some((1008, "publish needs a single-topic connection".to_string()))
    );
}

#[tokio::test]
async fn client_publish_can_be_disabled() {
    let s = start(Config {
        client_publish: false,
        ..config()
    })
    .await;
    let mut a = within("the handshake", s.connect("/ws/t")).await;
    assert_eq!(
        within(
            "the publish answer",
            s.post("/publish/t", "text/plain", b"server")
        )
        .await,
        202
    );
    expect_next(&mut a, "the server's publish", Message::text("server")).await;
    within("the refused publish", send_text(&mut a, "client")).await;
    assert_eq!(
        within("the 1008 close", close_frame(&mut a)).await,
        Some((
            1008,
            "client publish is disabled on this server".to_string()
        ))
    );
}

#[tokio::test]
async fn http_endpoints_answer_with_the_documented_statuses() {
    let s = start(Config {
        max_message_bytes: 1000,
        send_queue_bytes: 4096,
        ..config()
    })
    .await;
    let (status, text) = within(
        "the /healthz answer",
        s.http("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(text.ends_with("ok"));
    let (status, _) = within(
        "the unknown path's answer",
        s.http("GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 404);
    let long_topic = format!("/publish/{}", "x".repeat(129));
    for (path, body, want) in [
        ("/publish/bad%20topic", &b"x"[..], 400),
        (long_topic.as_str(), b"x", 400),
        ("/publish/t", b"\xff\xfe", 400),
        ("/publish/t", &[b'a'; 1000], 202),
        ("/publish/t", &[b'a'; 1001], 413),
    ] {
        let got = within("the publish answer", s.post(path, "text/plain", body)).await;
        assert_eq!(got, want, "{path} with {} bytes", body.len());
    }
    // Server-side publish obeys the same limit.
    let t = Topic::new("t").expect("a valid topic");
    let too_big = within(
        "the oversized publish",
        s.relay.publish(&t, Opcode::Binary, &[0; 1001]),
    )
    .await;
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
    assert_eq!(
        within("the chunked publish's answer", s.http(&chunked))
            .await
            .0,
        413
    );
    let (status, _) = within(
        "the GET /publish answer",
        s.http("GET /publish/t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 405);
}

/// The next data message on `ws` is `want` (bounded; `what` names it if it never comes).
async fn expect_next(ws: &mut Ws, what: &str, want: Message) {
    assert_eq!(within(what, next_data(ws)).await, want, "{what}");
}

/// One task per client that reads `messages` text messages and checks they are "0", "1", ...
/// in order (each read bounded); the task answers the client back.
fn readers_in_order(clients: Vec<Ws>, messages: usize) -> Vec<tokio::task::JoinHandle<Ws>> {
    clients
        .into_iter()
        .enumerate()
        .map(|(r, mut ws)| {
            tokio::spawn(async move {
                let what = format!("reader {r}'s next message");
                for expected in 0..messages {
                    let msg = within(&what, next_data(&mut ws))
                        .await
                        .into_text()
                        .expect("a text frame");
                    assert_eq!(
                        msg.as_str(),
                        expected.to_string(),
                        "reader {r}: out of order or lost"
                    );
                }
                ws
            })
        })
        .collect()
}
