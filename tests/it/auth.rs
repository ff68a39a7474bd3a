//! Access control over real sockets: JWT grants on upgrades and client publishes, API keys and
//! tokens on `POST /publish`, the origin allowlist, the per-address limit and the publish rate.
use crate::common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use shardcast::{
    AuthConfig, Config, DisconnectReason, JwtKey, Opcode, RejectReason, Secret, Topic,
};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &[u8] = b"test-secret-of-reasonable-length";

fn hs256(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .expect("encode a test token")
}

fn in_an_hour() -> u64 {
    jsonwebtoken::get_current_timestamp() + 3600
}

fn jwt_config(api_keys: &[&str]) -> Config {
    Config {
        auth: AuthConfig {
            jwt: Some(JwtKey::Hs256(Secret::new(SECRET))),
            api_keys: api_keys.iter().map(|k| Secret::new(k.as_bytes())).collect(),
            ..AuthConfig::default()
        },
        ..config()
    }
}

/// A valid WebSocket upgrade request for `path` with extra header lines.
fn ws_request(path: &str, extra: &str) -> String {
    upgrade_request("GET", path, &format!("{KEY}{V13}{extra}"))
}

fn publish_request(path: &str, auth: Option<&str>, body: &str) -> String {
    let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn tokens_gate_upgrades_by_topic() {
    let s = start(jwt_config(&[])).await;
    let reader = hs256(serde_json::json!({"exp": in_an_hour(), "subscribe": ["news.*"]}));
    let expired = hs256(serde_json::json!({"exp": 1_000_000, "subscribe": ["*"]}));
    let no_exp = hs256(serde_json::json!({"subscribe": ["*"]}));
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"exp": in_an_hour(), "subscribe": ["*"]}),
        &jsonwebtoken::EncodingKey::from_secret(b"another secret"),
    )
    .expect("encode");
    for (path, extra, status) in [
        ("/ws/news.a".to_string(), String::new(), 401),
        (format!("/ws/news.a?token={expired}"), String::new(), 401),
        (format!("/ws/news.a?token={no_exp}"), String::new(), 401),
        (format!("/ws/news.a?token={forged}"), String::new(), 401),
        ("/ws/news.a?token=not.a.jwt".into(), String::new(), 401),
        (format!("/ws/chat?token={reader}"), String::new(), 403),
        (
            format!("/ws?topic=news.a&topic=chat&token={reader}"),
            String::new(),
            403,
        ),
        (
            "/ws/chat".into(),
            format!("Authorization: Bearer {reader}\r\n"),
            403,
        ),
        (format!("/ws/news.a?token={reader}"), String::new(), 101),
        (
            "/ws/news.b".into(),
            format!("Authorization: Bearer {reader}\r\n"),
            101,
        ),
    ] {
        let (got, text) = within("an http answer", s.http(&ws_request(&path, &extra))).await;
        assert_eq!(got, status, "{path} {extra}: {text}");
        if status == 401 {
            assert!(
                text.to_ascii_lowercase()
                    .contains("www-authenticate: bearer"),
                "{text}"
            );
        }
    }
    let stats = s.relay.stats().await;
    assert_eq!(stats.rejections.get(RejectReason::Unauthorized), 5);
    assert_eq!(stats.rejections.get(RejectReason::Forbidden), 3);
    s.stop().await;
}

#[tokio::test]
async fn a_token_without_publish_rights_gets_1008_on_data() {
    let s = start(jwt_config(&[])).await;
    let reader = hs256(serde_json::json!({"exp": in_an_hour(), "subscribe": ["room"]}));
    let writer = hs256(serde_json::json!({
        "exp": in_an_hour(), "subscribe": ["room"], "publish": ["room"],
    }));
    let mut r = within(
        "a handshake",
        s.connect(&format!("/ws/room?token={reader}")),
    )
    .await;
    let mut w = within(
        "a handshake",
        s.connect(&format!("/ws/room?token={writer}")),
    )
    .await;
    within("a send", send_text(&mut w, "from the writer")).await;
    assert_eq!(next_text(&mut r).await, "from the writer");
    within("a send", send_text(&mut r, "from the reader")).await;
    assert_eq!(within("the close", close_code(&mut r)).await, Some(1008));
    // The writer got its own message, and nothing from the reader.
    assert_eq!(next_text(&mut w).await, "from the writer");
    within("a send", send_text(&mut w, "still here")).await;
    assert_eq!(next_text(&mut w).await, "still here");
    drop((r, w));
    s.stop().await;
}

#[tokio::test]
async fn http_publish_takes_an_api_key_or_a_publishing_token() {
    let s = start(jwt_config(&["key-one", "key-two"])).await;
    let sub = hs256(serde_json::json!({"exp": in_an_hour(), "subscribe": ["prices.*"]}));
    let publisher = hs256(serde_json::json!({"exp": in_an_hour(), "publish": ["prices.*"]}));
    let mut ws = within(
        "a handshake",
        s.connect(&format!("/ws/prices.eur?token={sub}")),
    )
    .await;
    for (auth, status) in [
        (None, 401),
        (Some("key-three"), 401),
        (Some(sub.as_str()), 403),
        (Some("key-two"), 202),
        (Some(publisher.as_str()), 202),
    ] {
        let req = publish_request("/publish/prices.eur", auth, "tick");
        assert_eq!(
            within("an http answer", s.http(&req)).await.0,
            status,
            "{auth:?}"
        );
    }
    // The query string carries a token too.
    let req = publish_request(&format!("/publish/prices.eur?token={publisher}"), None, "q");
    assert_eq!(within("an http answer", s.http(&req)).await.0, 202);
    for expected in ["tick", "tick", "q"] {
        assert_eq!(
            next_data(&mut ws)
                .await
                .into_text()
                .expect("a text message"),
            expected
        );
    }
    drop(ws);
    s.stop().await;
}

#[tokio::test]
async fn api_keys_alone_protect_publish_but_not_subscribe() {
    let mut c = config();
    c.auth.api_keys = vec![Secret::new(b"k".as_slice())];
    let s = start(c).await;
    let mut ws = within("a handshake", s.connect("/ws/open")).await;
    assert_eq!(
        within(
            "an http answer",
            s.http(&publish_request("/publish/open", None, "x"))
        )
        .await
        .0,
        401
    );
    assert_eq!(
        s.http(&publish_request("/publish/open", Some("k"), "y"))
            .await
            .0,
        202
    );
    assert_eq!(
        next_data(&mut ws)
            .await
            .into_text()
            .expect("a text message"),
        "y"
    );
    drop(ws);
    s.stop().await;
}

#[tokio::test]
async fn origins_outside_the_allowlist_get_403() {
    let mut c = config();
    c.auth.allowed_origins = vec![
        "https://app.example.com".into(),
        "https://*.example.org".into(),
    ];
    let s = start(c).await;
    for (origin, status) in [
        ("Origin: https://app.example.com\r\n", 101),
        ("Origin: https://eu.example.org\r\n", 101),
        ("", 101),
        ("Origin: https://evil.example.net\r\n", 403),
        ("Origin: https://example.org\r\n", 403),
        ("Origin: null\r\n", 403),
    ] {
        let (got, text) = within("an http answer", s.http(&ws_request("/ws/o", origin))).await;
        assert_eq!(got, status, "{origin}: {text}");
    }
    assert_eq!(
        s.relay.stats().await.rejections.get(RejectReason::Origin),
        3
    );
    assert_still_serving(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn the_per_address_limit_gives_429_and_frees_on_close() {
    let s = start(Config {
        max_connections_per_ip: Some(2),
        ..config()
    })
    .await;
    let ip = s.addr.ip();
    let mut a = within("a handshake", s.connect("/ws/ip")).await;
    let b = within("a handshake", s.connect("/ws/ip")).await;
    assert_eq!(s.relay.connections_from(ip), 2);
    let (status, _) = within("an http answer", s.http(&ws_request("/ws/ip", ""))).await;
    assert_eq!(status, 429);
    assert_eq!(
        s.relay
            .stats()
            .await
            .rejections
            .get(RejectReason::PerIpLimit),
        1
    );
    // Closing one gives its place back once the shard frees it.
    a.send(Message::Close(None)).await.expect("send close");
    assert_eq!(within("the close", close_code(&mut a)).await, Some(1000));
    drop(a);
    tokio::time::timeout(Duration::from_secs(10), async {
        while s.relay.connections_from(ip) != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the closed connection is freed");
    let c = within("a handshake", s.connect("/ws/ip")).await;
    assert_eq!(s.relay.connections_from(ip), 2);
    drop((b, c));
    s.stop().await;
}

/// `n` text frames `{prefix}0`, `{prefix}1`, .. in one write: they reach the server's reader
/// together, so it sees them at one instant of a paused clock.
fn texts(prefix: &str, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| client_frame(true, OP_TEXT, format!("{prefix}{i}").as_bytes()))
        .collect()
}

/// The next `n` messages at `ws` are `{prefix}0`, `{prefix}1`, ..
async fn expect_texts(ws: &mut Ws, prefix: &str, n: usize) {
    for i in 0..n {
        let got = within("a message at the watcher", next_data(ws)).await;
        assert_eq!(got, Message::text(format!("{prefix}{i}")));
    }
}

/// The server's close frame on a raw socket as (code, reason), after which the server must
/// end the connection and send nothing more. Bounded by `WAIT`.
async fn raw_close_then_end(s: &mut TcpStream) -> (u16, String) {
    let payload = within("the server's close frame", async {
        loop {
            match read_server_frame(s).await {
                Some((OP_CLOSE, p)) => return p,
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    })
    .await;
    assert!(
        payload.len() >= 2,
        "close frame without a code: {payload:?}"
    );
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let reason = String::from_utf8(payload[2..].to_vec()).expect("a UTF-8 close reason");
    let after = read_until_closed(s).await;
    assert!(after.is_empty(), "bytes after the close frame: {after:?}");
    (code, reason)
}

/// A paused clock: time moves only by `advance`, or by the runtime jumping to the next timer
/// when every task waits; the test bounds the latter.
#[tokio::test(start_paused = true)]
async fn publishing_faster_than_the_rate_closes_with_1008() {
    const RATE: u32 = 3;
    let exceeded = (1008, "publish rate exceeded".to_string());
    let s = start(Config {
        client_publish_rate: Some(RATE),
        ..config()
    })
    .await;
    let mut watcher = within(
        "the watcher's handshake",
        within("a handshake", s.connect("/ws/rate")),
    )
    .await;

    // One more than the burst at one instant: the burst goes out, the extra one closes.
    let mut fast = within("a raw client's handshake", raw_ws(s.addr, "/ws/rate")).await;
    raw_send(&mut fast, &texts("m", RATE as usize + 1)).await;
    assert_eq!(raw_close_then_end(&mut fast).await, exceeded);
    expect_texts(&mut watcher, "m", RATE as usize).await;
    drop(fast);

    // Refill, on one connection: the burst empties its bucket, one second gives the whole
    // burst back, and no more than that.
    let mut steady = within("a raw client's handshake", raw_ws(s.addr, "/ws/rate")).await;
    let t0 = Instant::now();
    raw_send(&mut steady, &texts("a", RATE as usize)).await;
    expect_texts(&mut watcher, "a", RATE as usize).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    raw_send(&mut steady, &texts("b", RATE as usize + 1)).await;
    expect_texts(&mut watcher, "b", RATE as usize).await;
    assert_eq!(raw_close_then_end(&mut steady).await, exceeded);
    // Beyond the advance, the clock moved less than one message's interval: without the
    // one-second period not even "b0" would have had an allowance.
    let drift = t0.elapsed() - Duration::from_secs(1);
    assert!(
        drift < Duration::from_secs(1) / RATE,
        "the clock drifted {drift:?} past the advance"
    );
    drop(steady);

    // Neither refused message was broadcast: a marker published now is the next thing seen.
    let topic = Topic::new("rate").expect("a valid topic name");
    s.relay
        .publish(&topic, Opcode::Text, b"marker")
        .await
        .expect("the relay accepts a publish");
    assert_eq!(
        within("the marker", next_data(&mut watcher)).await,
        Message::text("marker")
    );
    let stats = stats_until(&s, "both fast clients freed", |st| st.connections == 1).await;
    assert_eq!(stats.disconnects.get(DisconnectReason::RateLimited), 2);
    drop(watcher);
    within("the server to stop", s.stop()).await;
}
