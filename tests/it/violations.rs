//! Protocol violations and refused handshakes over raw loopback sockets: exact close codes and
//! HTTP statuses, their counters, no leaked connection, and a server that keeps serving.
use crate::common;

use std::time::Duration;

use common::*;
use shardcast::{Config, DisconnectReason, Opcode, RejectReason, Stats, Topic};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use DisconnectReason::{ClientClose, ProtocolError};

/// The topic every client in these tests uses, so that a bad client's data would reach the
/// bystander if it were broadcast.
const TOPIC: &str = "v";
const WS_PATH: &str = "/ws/v";
const PUBLISH_PATH: &str = "/publish/v";

/// `--max-message-bytes` in the tests that need a small one.
const LIMIT: usize = 1024;

/// `MAX_HEAD_BYTES` in `src/server.rs`: the largest request head accepted.
const HEAD_LIMIT: usize = 16 * 1024;

fn small_limit() -> Config {
    Config {
        max_message_bytes: LIMIT,
        send_queue_bytes: 64 * 1024,
        ..config()
    }
}

/// A running server with a bystander subscribed to [`TOPIC`] before any bad client arrives.
struct Scene {
    s: TestServer,
    bystander: Ws,
}

impl Scene {
    async fn start(config: Config) -> Self {
        let s = start(config).await;
        let bystander = within("the bystander's handshake", s.connect(WS_PATH)).await;
        Self { s, bystander }
    }

    /// A raw WebSocket on [`TOPIC`], upgraded and ready for hand-made frames.
    async fn raw_client(&self) -> TcpStream {
        within("a raw client's handshake", raw_ws(self.s.addr, WS_PATH)).await
    }

    /// Sends `bytes` on a fresh raw client and returns the code of the server's close frame,
    /// after checking that the server then ends the connection. The client is dropped.
    async fn close_code_for(&self, bytes: &[u8]) -> u16 {
        let mut raw = self.raw_client().await;
        raw_send(&mut raw, bytes).await;
        raw_close_code_then_end(&mut raw).await
    }

    /// Every case, each on its own connection, gets close `code`.
    async fn assert_each_closes_with(&self, code: u16, cases: &[(String, Vec<u8>)]) {
        for (what, bytes) in cases {
            assert_eq!(self.close_code_for(bytes).await, code, "{what}");
        }
    }

    async fn http(&self, request: &str) -> (u16, String) {
        within("an HTTP response", self.s.http(request)).await
    }

    /// Every request gets `status` and, if given, the header `(name, value)`.
    async fn assert_each_gets(
        &self,
        status: u16,
        want_header: Option<(&str, &str)>,
        requests: &[String],
    ) {
        for req in requests {
            let (got, text) = self.http(req).await;
            assert_eq!(got, status, "{req:?} got {text:?}");
            if let Some((name, value)) = want_header {
                assert_eq!(header(&text, name), Some(value), "{req:?} got {text:?}");
            }
        }
    }

    async fn bystander_message(&mut self) -> Message {
        within("a message at the bystander", next_data(&mut self.bystander)).await
    }

    /// Ends a test: the counters show exactly `disconnects` and `rejections`, every other
    /// client is freed (only the bystander is left), nothing a bad client sent reached the
    /// bystander, and the server still serves.
    async fn finish(
        mut self,
        disconnects: &[(DisconnectReason, u64)],
        rejections: &[(RejectReason, u64)],
    ) {
        let counted = |st: &Stats| {
            st.connections == 1
                && st.disconnects.total() == disconnects.iter().map(|d| d.1).sum::<u64>()
                && disconnects.iter().all(|&(w, n)| st.disconnects.get(w) == n)
                && st.rejections.total() == rejections.iter().map(|r| r.1).sum::<u64>()
                && rejections.iter().all(|&(w, n)| st.rejections.get(w) == n)
        };
        let what = format!(
            "only the bystander connected, disconnects {disconnects:?}, rejections {rejections:?}"
        );
        stats_until(&self.s, &what, counted).await;
        // Published after every bad client was closed: had anything they sent been broadcast,
        // it would reach the bystander first.
        let topic = Topic::new(TOPIC).expect("a valid topic name");
        self.s
            .relay
            .publish(&topic, Opcode::Text, b"marker")
            .await
            .expect("the relay accepts a publish");
        assert_eq!(self.bystander_message().await, Message::text("marker"));
        assert_still_serving(&self.s).await;
        // The bystander reads its 1001 and answers it, so the drain need not wait for it.
        let mut bystander = self.bystander;
        let goodbye = tokio::spawn(async move { close_code(&mut bystander).await });
        within("the server to stop", self.s.stop()).await;
        let code = within("the bystander's close", goodbye).await;
        assert_eq!(
            code.expect("the bystander's reader does not panic"),
            Some(1001)
        );
    }
}

/// Each case, on its own connection, gets close `code` and is counted as a protocol error;
/// then the checks of [`Scene::finish`].
async fn each_closes_with(config: Config, code: u16, cases: &[(String, Vec<u8>)]) {
    let scene = Scene::start(config).await;
    scene.assert_each_closes_with(code, cases).await;
    let n = cases.len() as u64;
    scene.finish(&[(ProtocolError, n)], &[]).await;
}

/// Each request gets `status` (and the header, if given) and is counted as a `reason`
/// refusal; then the checks of [`Scene::finish`].
async fn each_gets(
    status: u16,
    want_header: Option<(&str, &str)>,
    reason: RejectReason,
    requests: &[String],
) {
    let scene = Scene::start(config()).await;
    scene.assert_each_gets(status, want_header, requests).await;
    let n = requests.len() as u64;
    scene.finish(&[], &[(reason, n)]).await;
}

/// The header of a binary frame declaring a 64-bit `len`, masked, with no payload.
fn header_64(len: u64) -> Vec<u8> {
    let mut f = vec![0x80 | OP_BINARY, 0x80 | 127];
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[1, 2, 3, 4]);
    f
}

#[tokio::test]
async fn unmasked_client_frame_gets_1002() {
    let cases = [
        (
            "unmasked text".into(),
            vec![0x80 | OP_TEXT, 0x02, b'h', b'i'],
        ),
        ("unmasked ping".into(), vec![0x80 | OP_PING, 0x00]),
    ];
    each_closes_with(config(), 1002, &cases).await;
}

#[tokio::test]
async fn each_reserved_bit_gets_1002() {
    let mut cases = Vec::new();
    for (bit, name) in [(0x40, "RSV1"), (0x20, "RSV2"), (0x10, "RSV3")] {
        for (opcode, payload) in [(OP_TEXT, &b"x"[..]), (OP_PING, &b""[..])] {
            let mut f = client_frame(true, opcode, payload);
            f[0] |= bit;
            cases.push((format!("{name} on opcode {opcode:#x}"), f));
        }
    }
    each_closes_with(config(), 1002, &cases).await;
}

#[tokio::test]
async fn every_unknown_opcode_gets_1002() {
    let cases: Vec<_> = (0x3..=0x7)
        .chain(0xB..=0xF)
        .map(|op| (format!("opcode {op:#x}"), client_frame(true, op, b"x")))
        .collect();
    assert_eq!(cases.len(), 10);
    each_closes_with(config(), 1002, &cases).await;
}

#[tokio::test]
async fn fragmented_control_frame_gets_1002() {
    let mut inside_message = client_frame(false, OP_TEXT, b"a");
    inside_message.extend(client_frame(false, OP_PING, b"p"));
    let cases = [
        ("ping".into(), client_frame(false, OP_PING, b"")),
        ("pong".into(), client_frame(false, OP_PONG, b"")),
        (
            "close".into(),
            client_frame(false, OP_CLOSE, &close_payload(1000, b"")),
        ),
        ("ping inside a fragmented message".into(), inside_message),
    ];
    each_closes_with(config(), 1002, &cases).await;
}

#[tokio::test]
async fn control_payload_over_125_bytes_gets_1002() {
    let scene = Scene::start(config()).await;
    // 125 bytes is allowed: the pong echoes all of them. One more on the same connection is not.
    let mut raw = scene.raw_client().await;
    raw_send(&mut raw, &client_frame(true, OP_PING, &[5; 125])).await;
    let pong = within("the pong", read_server_frame(&mut raw)).await;
    assert_eq!(pong, Some((OP_PONG, vec![5; 125])));
    raw_send(&mut raw, &client_frame(true, OP_PING, &[5; 126])).await;
    assert_eq!(raw_close_code_then_end(&mut raw).await, 1002);
    drop(raw);
    let cases = [
        ("pong".into(), client_frame(true, OP_PONG, &[5; 126])),
        (
            "close".into(),
            client_frame(true, OP_CLOSE, &close_payload(1000, &[b'r'; 124])),
        ),
    ];
    scene.assert_each_closes_with(1002, &cases).await;
    scene.finish(&[(ProtocolError, 3)], &[]).await;
}

#[tokio::test]
async fn continuation_with_no_message_started_gets_1002() {
    let mut scene = Scene::start(config()).await;
    let mut after_complete = client_frame(true, OP_TEXT, b"complete");
    after_complete.extend(client_frame(true, OP_CONT, b"x"));
    let cases = [
        (
            "final continuation".into(),
            client_frame(true, OP_CONT, b"x"),
        ),
        (
            "non-final continuation".into(),
            client_frame(false, OP_CONT, b"x"),
        ),
        (
            "continuation after a complete message".into(),
            after_complete,
        ),
    ];
    scene.assert_each_closes_with(1002, &cases).await;
    // The complete message before the stray continuation was delivered.
    assert_eq!(scene.bystander_message().await, Message::text("complete"));
    scene.finish(&[(ProtocolError, 3)], &[]).await;
}

#[tokio::test]
async fn new_data_frame_inside_a_fragmented_message_gets_1002() {
    let nested = |first: u8, second: u8, second_fin: bool| {
        let mut f = client_frame(false, first, b"a");
        f.extend(client_frame(second_fin, second, b"b"));
        f
    };
    let cases = [
        ("text in text".into(), nested(OP_TEXT, OP_TEXT, true)),
        ("binary in text".into(), nested(OP_TEXT, OP_BINARY, true)),
        (
            "non-final text in binary".into(),
            nested(OP_BINARY, OP_TEXT, false),
        ),
    ];
    each_closes_with(config(), 1002, &cases).await;
}

#[tokio::test]
async fn length_with_the_top_bit_set_gets_1002() {
    let cases = [
        ("2^63".into(), header_64(1 << 63)),
        ("2^64 - 1".into(), header_64(u64::MAX)),
    ];
    each_closes_with(config(), 1002, &cases).await;
}

#[tokio::test]
async fn invalid_utf8_text_gets_1007() {
    let one = |b: &[u8]| client_frame(true, OP_TEXT, b);
    let cases = [
        ("bad continuation byte".into(), one(&[0xc3, 0x28])),
        ("0xff".into(), one(&[b'o', b'k', 0xff])),
        ("overlong encoding".into(), one(&[0xc0, 0xaf])),
        ("surrogate".into(), one(&[0xed, 0xa0, 0x80])),
        ("above U+10FFFF".into(), one(&[0xf4, 0x90, 0x80, 0x80])),
        ("truncated in one frame".into(), one(&[b'a', 0xe2, 0x82])),
        (
            "invalid across a fragment boundary".into(),
            fragmented(OP_TEXT, &[&[0xe2, 0x82], &[0x28]]),
        ),
        (
            "invalid in a middle fragment".into(),
            fragmented(OP_TEXT, &[b"ab", &[0xff], b"cd"]),
        ),
        (
            "truncated at the final fragment".into(),
            fragmented(OP_TEXT, &[b"a", &[0xe2, 0x82]]),
        ),
    ];
    each_closes_with(config(), 1007, &cases).await;
}

#[tokio::test]
async fn invalid_utf8_mid_frame_gets_1007_before_the_frame_ends() {
    let scene = Scene::start(config()).await;
    // A frame announcing 1000 bytes of text, invalid from byte 120 on. Only its header and
    // first 150 bytes are sent, in two chops, and the rest never comes: without a check made
    // as the bytes arrive, no close could come (heartbeats are an hour away).
    let mut payload = "ok €, ".repeat(200).into_bytes();
    payload.truncate(1000);
    payload[120] = 0xff;
    let alone = client_frame(true, OP_TEXT, &payload);
    // The same frame as the continuation of a fragment that ends inside a "€" (E2 82 AC),
    // which the continuation's first byte completes.
    let mut after_fragment = client_frame(false, OP_TEXT, &[b'a', 0xe2, 0x82]);
    payload[0] = 0xac;
    after_fragment.extend(client_frame(true, OP_CONT, &payload));
    for (what, wire) in [("one frame", alone), ("a continuation", after_fragment)] {
        let mut raw = scene.raw_client().await;
        raw.set_nodelay(true)
            .expect("TCP_NODELAY on the raw client");
        let second_chop = wire.len() - payload.len() + 100;
        raw_send(&mut raw, &wire[..second_chop]).await;
        raw_send(&mut raw, &wire[second_chop..second_chop + 50]).await;
        let close = within("the close for invalid UTF-8", raw_close_frame(&mut raw)).await;
        let want = (1007, "text message is not valid utf-8".to_string());
        assert_eq!(close, Some(want), "{what}");
        let after = read_until_closed(&mut raw).await;
        assert!(
            after.is_empty(),
            "{what}: bytes after the close frame: {after:?}"
        );
    }
    scene.finish(&[(ProtocolError, 2)], &[]).await;
}

#[tokio::test]
async fn code_point_split_across_fragments_is_delivered() {
    let mut scene = Scene::start(config()).await;
    let mut raw = scene.raw_client().await;
    let euro = "€".as_bytes();
    raw_send(&mut raw, &fragmented(OP_TEXT, &[&euro[..1], &euro[1..]])).await;
    assert_eq!(scene.bystander_message().await, Message::text("€"));
    // A four-byte code point in four fragments, a ping between two of them.
    let face = "a😀".as_bytes();
    let mut wire = client_frame(false, OP_TEXT, &face[..2]);
    wire.extend(client_frame(false, OP_CONT, &face[2..3]));
    wire.extend(client_frame(true, OP_PING, b""));
    wire.extend(client_frame(false, OP_CONT, &face[3..4]));
    wire.extend(client_frame(true, OP_CONT, &face[4..]));
    raw_send(&mut raw, &wire).await;
    assert_eq!(scene.bystander_message().await, Message::text("a😀"));
    // The raw client leaves with a normal close.
    raw_send(
        &mut raw,
        &client_frame(true, OP_CLOSE, &close_payload(1000, b"")),
    )
    .await;
    assert_eq!(raw_close_code_then_end(&mut raw).await, 1000);
    drop(raw);
    scene.finish(&[(ClientClose, 1)], &[]).await;
}

#[tokio::test]
async fn close_payload_of_one_byte_gets_1002() {
    let cases = [("1-byte close".into(), client_frame(true, OP_CLOSE, &[0x03]))];
    each_closes_with(config(), 1002, &cases).await;
}

#[tokio::test]
async fn invalid_close_codes_get_1002() {
    let scene = Scene::start(config()).await;
    let invalid = [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ];
    let cases: Vec<_> = invalid
        .iter()
        .map(|&c| {
            let f = client_frame(true, OP_CLOSE, &close_payload(c, b"why"));
            (format!("close code {c}"), f)
        })
        .collect();
    scene.assert_each_closes_with(1002, &cases).await;
    // The valid codes at the edges of those ranges are echoed.
    let valid = [1000u16, 1003, 1007, 1014, 3000, 4999];
    for code in valid {
        let echoed = scene
            .close_code_for(&client_frame(true, OP_CLOSE, &close_payload(code, b"why")))
            .await;
        assert_eq!(echoed, code, "valid close code {code}");
    }
    scene
        .finish(&[(ProtocolError, 12), (ClientClose, 6)], &[])
        .await;
}

#[tokio::test]
async fn invalid_utf8_close_reason_gets_1002() {
    let cases = [
        (
            "0xff in the reason".into(),
            client_frame(true, OP_CLOSE, &close_payload(1000, &[b'o', 0xff])),
        ),
        (
            "truncated code point".into(),
            client_frame(true, OP_CLOSE, &close_payload(1000, &[0xe2, 0x82])),
        ),
    ];
    each_closes_with(config(), 1002, &cases).await;
}

#[tokio::test]
async fn message_over_the_limit_in_one_frame_gets_1009() {
    let mut scene = Scene::start(small_limit()).await;
    // Exactly at the limit is delivered.
    let mut raw = scene.raw_client().await;
    raw_send(&mut raw, &client_frame(true, OP_BINARY, &[7; LIMIT])).await;
    assert_eq!(
        scene.bystander_message().await,
        Message::binary(vec![7; LIMIT])
    );
    drop(raw);
    let cases = [
        (
            "binary".into(),
            client_frame(true, OP_BINARY, &[7; LIMIT + 1]),
        ),
        (
            "text".into(),
            client_frame(true, OP_TEXT, &[b't'; LIMIT + 1]),
        ),
    ];
    scene.assert_each_closes_with(1009, &cases).await;
    scene
        .finish(&[(ProtocolError, 2), (ClientClose, 1)], &[])
        .await;
}

#[tokio::test]
async fn fragments_adding_up_past_the_limit_get_1009() {
    let mut scene = Scene::start(small_limit()).await;
    // Eight fragments that add up to exactly the limit are delivered as one message.
    let mut raw = scene.raw_client().await;
    let part = [9u8; LIMIT / 8];
    raw_send(&mut raw, &fragmented(OP_BINARY, &[&part[..]; 8])).await;
    assert_eq!(
        scene.bystander_message().await,
        Message::binary(vec![9; LIMIT])
    );
    drop(raw);
    // Eleven 100-byte fragments, none final: the server refuses once the sum passes the limit,
    // without waiting for the message to end.
    let mut past = client_frame(false, OP_BINARY, &[7; 100]);
    for _ in 0..10 {
        past.extend(client_frame(false, OP_CONT, &[7; 100]));
    }
    // 1025 one-byte fragments, none final, with pings between them.
    let mut tiny = client_frame(false, OP_TEXT, b"t");
    for _ in 0..LIMIT {
        tiny.extend(client_frame(false, OP_CONT, b"t"));
        tiny.extend(client_frame(true, OP_PING, b""));
    }
    let cases = [
        ("100-byte fragments".into(), past),
        ("1-byte fragments".into(), tiny),
    ];
    scene.assert_each_closes_with(1009, &cases).await;
    scene
        .finish(&[(ProtocolError, 2), (ClientClose, 1)], &[])
        .await;
}

#[tokio::test]
async fn huge_declared_length_gets_1009_before_any_payload() {
    // Only the headers are sent: the close must come without the payload, or this would hang
    // until `within` gives up.
    let over_16 = vec![0x80 | OP_BINARY, 0x80 | 126, 0xff, 0xff, 1, 2, 3, 4];
    let cases = [
        ("2^40 bytes".into(), header_64(1 << 40)),
        ("2^63 - 1 bytes".into(), header_64((1 << 63) - 1)),
        ("65535 bytes".into(), over_16),
    ];
    each_closes_with(small_limit(), 1009, &cases).await;
}

#[tokio::test]
async fn frames_after_the_clients_close_are_ignored() {
    let scene = Scene::start(config()).await;
    let mut raw = scene.raw_client().await;
    let mut bytes = client_frame(true, OP_CLOSE, &close_payload(4000, b"bye"));
    bytes.extend(client_frame(true, OP_TEXT, b"in the same write"));
    bytes.extend(client_frame(true, OP_PING, b"p"));
    raw_send(&mut raw, &bytes).await;
    // The echo comes first and alone: no pong for the ping, no message for the text.
    let echo = within("the echoed close", read_server_frame(&mut raw)).await;
    assert_eq!(echo, Some((OP_CLOSE, 4000u16.to_be_bytes().to_vec())));
    raw_send(&mut raw, &client_frame(true, OP_TEXT, b"after the echo")).await;
    let after = read_until_closed(&mut raw).await;
    assert!(after.is_empty(), "bytes after the close frame: {after:?}");
    drop(raw);
    // `finish` checks that the bystander's next message is its marker: neither text went out.
    scene.finish(&[(ClientClose, 1)], &[]).await;
}

#[tokio::test]
async fn wrong_websocket_version_gets_426_naming_13() {
    let requests: Vec<_> = ["0", "8", "12", "14"]
        .iter()
        .map(|v| {
            let headers = format!("{KEY}Sec-WebSocket-Version: {v}\r\n");
            upgrade_request("GET", WS_PATH, &headers)
        })
        .collect();
    each_gets(
        426,
        Some(("sec-websocket-version", "13")),
        RejectReason::BadVersion,
        &requests,
    )
    .await;
}

#[tokio::test]
async fn missing_or_malformed_key_gets_400() {
    let key = |k: &str| format!("Sec-WebSocket-Key: {k}\r\n");
    let keys = [
        String::new(),                           // missing
        key(""),                                 // empty
        key("short"),                            // not 16 bytes
        key("AAAAAAAAAAAAAAAAAAAAAAA="),         // base64 of 17 bytes
        key("dGhlIHNhbXBsZSBub25jZ!=="),         // not base64
        key("dGhlIHNhbXBsZSBub25jZQ==dGhlIHNh"), // too long
        format!("{KEY}{KEY}"),                   // twice
    ];
    let requests: Vec<_> = keys
        .iter()
        .map(|k| upgrade_request("GET", WS_PATH, &format!("{k}{V13}")))
        .collect();
    each_gets(400, None, RejectReason::BadKey, &requests).await;
}

#[tokio::test]
async fn non_get_upgrade_gets_405_allowing_get() {
    let requests: Vec<_> = ["POST", "PUT", "DELETE", "PATCH"]
        .iter()
        .map(|m| upgrade_request(m, WS_PATH, &format!("{KEY}{V13}")))
        .collect();
    each_gets(
        405,
        Some(("allow", "GET")),
        RejectReason::MethodNotAllowed,
        &requests,
    )
    .await;
}

#[tokio::test]
async fn upgrade_without_upgrade_headers_gets_426() {
    let plain = format!("GET {WS_PATH} HTTP/1.1\r\nHost: x\r\n{KEY}{V13}\r\n");
    each_gets(
        426,
        Some(("upgrade", "websocket")),
        RejectReason::NotWebSocket,
        &[plain],
    )
    .await;
}

#[tokio::test]
async fn bad_topics_get_400() {
    let requests: Vec<_> = ["/ws/a%2Fb", "/ws/a/b", "/ws", "/ws?topic="]
        .iter()
        .map(|path| upgrade_request("GET", path, &format!("{KEY}{V13}")))
        .collect();
    each_gets(400, None, RejectReason::BadTopic, &requests).await;
}

#[tokio::test]
async fn request_head_over_16_kib_gets_431() {
    let scene = Scene::start(config()).await;
    let long = format!("X-Padding: {}\r\n", "a".repeat(HEAD_LIMIT));
    let many: String = (0..90)
        .map(|i| format!("X-Pad-{i:02}: {}\r\n", "b".repeat(200)))
        .collect();
    let requests: Vec<_> = [long, many]
        .iter()
        .map(|extra| upgrade_request("GET", WS_PATH, &format!("{KEY}{V13}{extra}")))
        .collect();
    for req in &requests {
        assert!(req.len() > HEAD_LIMIT);
    }
    scene.assert_each_gets(431, None, &requests).await;
    // A head a little under the limit still upgrades.
    let fine = format!("X-Padding: {}\r\n", "a".repeat(HEAD_LIMIT - 1024));
    let tcp = TcpStream::connect(scene.s.addr)
        .await
        .expect("connect to the test server");
    let ok = within("a large head's upgrade", raw_ws_with(tcp, WS_PATH, &fine)).await;
    drop(ok);
    scene
        .finish(&[(ClientClose, 1)], &[(RejectReason::HeadersTooLarge, 2)])
        .await;
}

#[tokio::test]
async fn malformed_request_heads_get_400_and_are_counted() {
    let scene = Scene::start(config()).await;
    let requests = [
        // Not a request line at all.
        "\x01\x02 garbage\r\n\r\n".to_string(),
        // An HTTP version hyper does not speak.
        format!("GET {WS_PATH} HTTP/9.9\r\nHost: x\r\n\r\n"),
        // A space inside a header name.
        upgrade_request("GET", WS_PATH, &format!("{KEY}{V13}Bad Name: y\r\n")),
        // A control byte inside a header value.
        upgrade_request("GET", WS_PATH, &format!("{KEY}{V13}X-Bad: a\x01b\r\n")),
    ];
    for (i, req) in requests.iter().enumerate() {
        let (status, text) = scene.http(req).await;
        assert_eq!(status, 400, "{req:?} got {text:?}");
        // Each is counted once, as a bad request and as nothing else.
        let want = i as u64 + 1;
        stats_until(&scene.s, &format!("{want} bad requests"), |st| {
            st.rejections.get(RejectReason::BadRequest) == want && st.rejections.total() == want
        })
        .await;
    }
    // An HTTP/2 preface on this HTTP/1.1 port: hyper answers nothing and closes.
    let mut h2 = within("connect", TcpStream::connect(scene.s.addr))
        .await
        .expect("connect to the test server");
    raw_send(&mut h2, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let answer = read_until_closed(&mut h2).await;
    assert!(
        answer.is_empty(),
        "answered an HTTP/2 preface: {}",
        String::from_utf8_lossy(&answer)
    );
    drop(h2);
    let n = requests.len() as u64 + 1;
    stats_until(&scene.s, &format!("{n} bad requests"), |st| {
        st.rejections.get(RejectReason::BadRequest) == n
    })
    .await;
    // The counter reaches the metrics under its own label.
    let (status, metrics) = scene
        .http("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 200, "{metrics}");
    let line = format!("shardcast_handshake_rejections_total{{reason=\"bad_request\"}} {n}\n");
    assert!(metrics.contains(&line), "{line:?} missing from:\n{metrics}");
    scene.finish(&[], &[(RejectReason::BadRequest, n)]).await;
}

/// A paused clock: the runtime jumps to the next timer whenever every task waits, so nothing
/// sleeps for real and the timeout arithmetic is exact to a shard tick (100 ms at most).
#[tokio::test(start_paused = true)]
async fn head_trickled_slower_than_the_handshake_timeout_is_cut_off() {
    let timeout = Duration::from_secs(3);
    // One byte every half second: each arrives well within the timeout, the head never does.
    let step = Duration::from_millis(500);
    let scene = Scene::start(Config {
        handshake_timeout: timeout,
        ..config()
    })
    .await;
    let head = upgrade_request("GET", WS_PATH, &format!("{KEY}{V13}"));
    assert!(step * head.len() as u32 > timeout * 10);
    let t0 = Instant::now();
    let tcp = within("connect", TcpStream::connect(scene.s.addr))
        .await
        .expect("connect to the test server");
    let (rx, tx) = tcp.into_split();
    let (closed_after, sent) = head_cut_off(rx, tx, head, step, t0).await;
    assert!(
        closed_after >= timeout && closed_after <= timeout + Duration::from_secs(1),
        "closed after {closed_after:?}, {sent} bytes in"
    );
    scene
        .finish(&[], &[(RejectReason::HandshakeTimeout, 1)])
        .await;
}

#[tokio::test]
async fn publish_declaring_a_body_over_the_limit_gets_413_before_the_body() {
    let mut scene = Scene::start(small_limit()).await;
    // 1 GiB declared, three bytes sent: an answer at all shows the rest was never waited for.
    let req = format!(
        "POST {PUBLISH_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\nabc",
        1u64 << 30
    );
    assert_eq!(scene.http(&req).await.0, 413);
    // Publishing still works, and reaches the subscriber.
    let accepted = within(
        "a publish",
        scene.s.post(PUBLISH_PATH, "text/plain", b"fits"),
    )
    .await;
    assert_eq!(accepted, 202);
    assert_eq!(scene.bystander_message().await, Message::text("fits"));
    scene.finish(&[], &[(RejectReason::TooLarge, 1)]).await;
}

#[tokio::test]
async fn publish_with_a_chunked_body_streaming_past_the_limit_gets_413() {
    /// Far more than loopback socket buffers hold: if the server read on after the limit,
    /// every byte of it would be accepted.
    const STREAM: usize = 64 << 20;
    let scene = Scene::start(small_limit()).await;
    let mut tcp = TcpStream::connect(scene.s.addr)
        .await
        .expect("connect to the test server");
    let (mut rx, mut tx) = tcp.split();
    let chunk = format!("400\r\n{}\r\n", "c".repeat(1024));
    let send = async {
        let head = format!(
            "POST {PUBLISH_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let mut sent = 0;
        if tx.write_all(head.as_bytes()).await.is_ok() {
            // Never the last chunk: the body does not end.
            while sent < STREAM && tx.write_all(chunk.as_bytes()).await.is_ok() {
                sent += 1024;
            }
        }
        sent
    };
    let ((status, text), sent) = within("a 413 and the stream cut off", async {
        tokio::join!(read_http_response(&mut rx), send)
    })
    .await;
    assert_eq!(status, 413, "{text}");
    assert!(sent > LIMIT, "refused before the limit: {sent} bytes");
    assert!(sent < STREAM, "the server read all {sent} bytes");
    scene.finish(&[], &[(RejectReason::TooLarge, 1)]).await;
}
