//! TLS and key handling over real sockets: `wss://` and `https://` on one port with a
//! certificate made at runtime, a plain-text client refused without harm, one handshake
//! deadline for TLS and the request head, and ES256 and RS256 tokens checked against a PEM
//! public key; TLS connections that the shard encrypts in place: large messages and backlogs
//! through a slow reader arrive whole, a slow consumer's 4008 comes through, and each
//! connection costs the server one descriptor. Client publishing and JWT grants in general
//! are in `auth.rs`.
use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::brokers::{Proc, free_port};
use common::*;
use futures_util::StreamExt;
use shardcast::{Config, DisconnectReason, JwtKey, Opcode, RejectReason, TlsConfig, Topic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// A self-signed certificate for `localhost`, written where the server can read it.
struct Certificate {
    _dir: tempfile::TempDir,
    tls: TlsConfig,
    connector: TlsConnector,
}

fn certificate() -> Certificate {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("generate a certificate");
    let dir = tempfile::tempdir().expect("temporary directory");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    let mut roots = RootCertStore::empty();
    roots
        .add(ck.cert.der().clone())
        .expect("trust the certificate");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Certificate {
        _dir: dir,
        tls: TlsConfig { cert, key },
        connector: TlsConnector::from(Arc::new(client)),
    }
}

async fn tls_connect(c: &Certificate, s: &TestServer) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(s.addr).await.expect("connect");
    tls_over(c, tcp).await
}

async fn tls_over(c: &Certificate, tcp: TcpStream) -> TlsStream<TcpStream> {
    let name = ServerName::try_from("localhost").expect("server name");
    c.connector.connect(name, tcp).await.expect("tls handshake")
}

async fn wss(c: &Certificate, s: &TestServer, path: &str) -> WebSocketStream<TlsStream<TcpStream>> {
    wss_over(tls_connect(c, s).await, path).await
}

async fn wss_over(
    stream: TlsStream<TcpStream>,
    path: &str,
) -> WebSocketStream<TlsStream<TcpStream>> {
    let (ws, res) = tokio_tungstenite::client_async(format!("wss://localhost{path}"), stream)
        .await
        .expect("websocket handshake over tls");
    assert_eq!(res.status(), 101);
    ws
}

async fn https(c: &Certificate, s: &TestServer, request: &str) -> String {
    let mut stream = tls_connect(c, s).await;
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut out = Vec::new();
    // `Connection: close`: the server ends the stream after the response.
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The next text or binary message, past pings and pongs.
async fn next_message<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(m)) if m.is_ping() || m.is_pong() => continue,
            Some(Ok(m)) if m.is_text() || m.is_binary() => return m,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

async fn next_text<S>(ws: &mut WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match next_message(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

#[tokio::test]
async fn wss_and_https_share_the_port() {
    let cert = certificate();
    let s = start(Config {
        tls: Some(cert.tls.clone()),
        ..config()
    })
    .await;
    let mut a = wss(&cert, &s, "/ws/secure").await;
    let mut b = wss(&cert, &s, "/ws/secure").await;
    futures_util::SinkExt::send(&mut a, "over tls".into())
        .await
        .expect("send");
    assert_eq!(next_text(&mut b).await, "over tls");
    assert_eq!(next_text(&mut a).await, "over tls");
    let body = "from https";
    let res = https(
        &cert,
        &s,
        &format!(
            "POST /publish/secure HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 202"), "{res}");
    assert_eq!(next_text(&mut a).await, body);
    assert_eq!(next_text(&mut b).await, body);
    // A plain-text client on the TLS port gets nothing useful and harms no one.
    let (status, _) = {
        let mut plain = TcpStream::connect(s.addr).await.expect("connect");
        plain
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let _ = plain.read_to_end(&mut buf).await;
        (buf.starts_with(b"HTTP/1.1 200"), ())
    };
    assert!(!status, "plain HTTP must not be served on the TLS port");
    assert_eq!(
        s.relay
            .stats()
            .await
            .rejections
            .get(shardcast::RejectReason::TlsHandshake),
        1
    );
    futures_util::SinkExt::send(&mut b, "still secure".into())
        .await
        .expect("send");
    assert_eq!(next_text(&mut a).await, "still secure");
    drop((a, b));
    s.stop().await;
}

#[tokio::test]
async fn es256_tokens_are_checked_against_a_pem_public_key() {
    let signer = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ec key");
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ec key");
    let mut c = config();
    c.auth.jwt = Some(JwtKey::PublicKeyPem(signer.public_key_pem().into_bytes()));
    let s = start(c).await;
    let token = |key: &rcgen::KeyPair| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &serde_json::json!({
                "exp": jsonwebtoken::get_current_timestamp() + 600,
                "subscribe": ["t"],
            }),
            &jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())
                .expect("signing key"),
        )
        .expect("sign")
    };
    let upgrade =
        |t: String| upgrade_request("GET", &format!("/ws/t?token={t}"), &format!("{KEY}{V13}"));
    assert_eq!(s.http(&upgrade(token(&signer))).await.0, 101);
    assert_eq!(s.http(&upgrade(token(&other))).await.0, 401);
    // An HS256 token must not pass where ES256 is expected, whatever it is signed with.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"exp": jsonwebtoken::get_current_timestamp() + 600, "subscribe": ["t"]}),
        &jsonwebtoken::EncodingKey::from_secret(signer.public_key_pem().as_bytes()),
    )
    .expect("sign");
    assert_eq!(s.http(&upgrade(hs)).await.0, 401);
    s.stop().await;
}

/// A paused clock: the runtime jumps to the next timer whenever every task waits, so nothing
/// sleeps for real and the timeout arithmetic is exact.
#[tokio::test(start_paused = true)]
async fn tls_and_the_request_head_share_one_handshake_deadline() {
    let timeout = Duration::from_secs(4);
    // The client spends most of the budget before its TLS handshake...
    let tls_after = Duration::from_secs(3);
    // ...then sends the head a byte every half second: each byte in time, the head never.
    let step = Duration::from_millis(500);
    let cert = certificate();
    let s = start(Config {
        tls: Some(cert.tls.clone()),
        handshake_timeout: timeout,
        ..config()
    })
    .await;
    let head = upgrade_request("GET", "/ws/slow", &format!("{KEY}{V13}"));
    assert!(step * head.len() as u32 > timeout * 10);
    let t0 = Instant::now();
    let tcp = within("connect", TcpStream::connect(s.addr))
        .await
        .expect("connect to the test server");
    tokio::time::sleep(tls_after).await;
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = within("the tls handshake", cert.connector.connect(name, tcp))
        .await
        .expect("the tls handshake completes within the deadline");
    assert_eq!(
        t0.elapsed(),
        tls_after,
        "the tls handshake took virtual time"
    );
    let (rx, tx) = tokio::io::split(tls);
    let (closed_after, sent) = head_cut_off(rx, tx, head, step, t0).await;
    // Cut off at the one deadline, not a fresh timeout after TLS (which would be 7 s).
    assert!(
        closed_after >= timeout && closed_after < timeout + step,
        "closed after {closed_after:?}, {sent} bytes in"
    );
    stats_until(&s, "one handshake timeout", |st| {
        st.rejections.get(RejectReason::HandshakeTimeout) == 1 && st.rejections.total() == 1
    })
    .await;
    // The server still serves over TLS.
    let mut a = within("a wss handshake", wss(&cert, &s, "/ws/after")).await;
    let mut b = within("a wss handshake", wss(&cert, &s, "/ws/after")).await;
    futures_util::SinkExt::send(&mut a, "alive".into())
        .await
        .expect("send");
    assert_eq!(within("a message", next_text(&mut b)).await, "alive");
    drop((a, b));
    within("the server to stop", s.stop()).await;
}

/// A committed RSA-2048 pair for tests only (see `tests/data/README.md`): rcgen on ring cannot
/// generate RSA keys.
const RS256_TEST_KEY: &[u8] = include_bytes!("../data/rs256-test-key.pem");
const RS256_TEST_PUBLIC_KEY: &[u8] = include_bytes!("../data/rs256-test-key.pub.pem");

#[tokio::test]
async fn rs256_tokens_are_checked_against_a_pem_public_key() {
    let mut c = config();
    c.auth.jwt = Some(JwtKey::PublicKeyPem(RS256_TEST_PUBLIC_KEY.to_vec()));
    let s = start(c).await;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = |exp: u64| serde_json::json!({"exp": exp, "subscribe": ["t"], "publish": ["t"]});
    let rs256 = |claims: &serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            claims,
            &jsonwebtoken::EncodingKey::from_rsa_pem(RS256_TEST_KEY).expect("the test RSA key"),
        )
        .expect("sign")
    };
    let hs256 = |secret: &[u8]| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims(now + 600),
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .expect("sign")
    };
    let valid = rs256(&claims(now + 600));
    // A valid token upgrades, and a message flows between two clients holding it.
    let mut a = within(
        "an rs256 upgrade",
        s.connect(&format!("/ws/t?token={valid}")),
    )
    .await;
    let mut b = within(
        "an rs256 upgrade",
        s.connect(&format!("/ws/t?token={valid}")),
    )
    .await;
    send_text(&mut a, "signed with rsa").await;
    assert_eq!(
        within("a message", next_text(&mut b)).await,
        "signed with rsa"
    );
    // Past `exp` by far more than the leeway.
    let expired = rs256(&claims(now - 3600));
    // The valid token's signature over a payload granting more.
    let widened = {
        let parts: Vec<&str> = valid.split('.').collect();
        let other = rs256(&serde_json::json!({"exp": now + 600, "subscribe": ["*"]}));
        let payload = other.split('.').nth(1).expect("a payload part");
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let upgrade =
        |t: &str| upgrade_request("GET", &format!("/ws/t?token={t}"), &format!("{KEY}{V13}"));
    let refused = [
        ("expired", expired),
        ("payload changed under the signature", widened),
        // HS256 must not pass where RS256 is expected: neither with some secret, nor with the
        // public key itself as the HMAC secret (the algorithm confusion attack).
        (
            "hs256 with a secret",
            hs256(b"test-secret-of-reasonable-length"),
        ),
        ("hs256 with the public key", hs256(RS256_TEST_PUBLIC_KEY)),
    ];
    for (what, token) in &refused {
        let (status, text) = within("an HTTP response", s.http(&upgrade(token))).await;
        assert_eq!(status, 401, "{what}: {text}");
    }
    let stats = s.relay.stats().await;
    assert_eq!(
        stats.rejections.get(RejectReason::Unauthorized),
        refused.len() as u64
    );
    drop((a, b));
    within("the server to stop", s.stop()).await;
}

/// The payload of message `i` of [`tls_backlogs_arrive_whole_and_in_order`]: sizes from one
/// byte to 200 KiB (many TLS records, more than one sealed write), contents that tell
/// messages and offsets apart.
fn sized(i: usize) -> Vec<u8> {
    let len = [1, 100, 16_384, 16_385, 70_000, 200_000, 3, 65_536][i % 8];
    (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
}

/// A subscriber with a 4 KiB receive buffer that reads nothing while 40 messages (2.5 MiB)
/// are published: the shard's sealed writes block with encrypted output held back, again and
/// again. Once it reads, it gets every message whole and in order, as does the publisher.
#[tokio::test]
async fn tls_backlogs_arrive_whole_and_in_order() {
    const N: usize = 40;
    let cert = certificate();
    let s = start(Config {
        tls: Some(cert.tls.clone()),
        max_message_bytes: 256 * 1024,
        send_queue_bytes: 8 << 20,
        ..config()
    })
    .await;
    let tcp = small_buffer_connect(s.addr, "the slow subscriber").await;
    let mut slow = wss_over(tls_over(&cert, tcp).await, "/ws/backlog").await;
    let mut publisher = wss(&cert, &s, "/ws/backlog").await;
    let want: Vec<Vec<u8>> = (0..N).map(sized).collect();
    for payload in &want {
        futures_util::SinkExt::send(&mut publisher, Message::binary(payload.clone()))
            .await
            .expect("publish");
        // The publisher reads its own copy, so only the subscriber falls behind.
        assert_eq!(&next_binary(&mut publisher).await, payload);
    }
    let got = within("the slow subscriber's backlog", async {
        let mut got = Vec::new();
        while got.len() < N {
            got.push(next_binary(&mut slow).await);
        }
        got
    })
    .await;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g == w, "message {i}: {} bytes, want {}", g.len(), w.len());
    }
    drop((slow, publisher));
    s.stop().await;
}

async fn next_binary<S>(ws: &mut WebSocketStream<S>) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match next_message(ws).await {
        Message::Binary(b) => b.to_vec(),
        other => panic!("expected a binary message, got {other:?}"),
    }
}

/// A TLS subscriber that reads nothing passes its 64 KiB budget: it is dropped (4008) while
/// a fast one goes on. When it reads, it finds a prefix of the messages, in order, then the
/// close frame, encrypted whole after what the shard had begun to send.
#[tokio::test]
async fn tls_slow_consumer_gets_4008_after_a_prefix() {
    let cert = certificate();
    let s = start(Config {
        tls: Some(cert.tls.clone()),
        send_queue_bytes: 64 * 1024,
        max_message_bytes: 16 * 1024,
        ..config()
    })
    .await;
    let tcp = small_buffer_connect(s.addr, "the slow subscriber").await;
    let mut slow = wss_over(tls_over(&cert, tcp).await, "/ws/flood").await;
    let mut fast = wss(&cert, &s, "/ws/flood").await;
    let mut sent = 0u32;
    // Bounded: 64 KiB of budget and the kernel's buffers take far fewer than 2000 messages
    // of 8 KiB.
    while stats_now(&s)
        .await
        .disconnects
        .get(DisconnectReason::SlowConsumer)
        == 0
    {
        assert!(sent < 2000, "the slow consumer was never dropped");
        let mut payload = vec![0u8; 8192];
        payload[..4].copy_from_slice(&sent.to_be_bytes());
        s.relay
            .publish(
                &Topic::new("flood").expect("topic"),
                Opcode::Binary,
                &payload,
            )
            .await
            .expect("publish");
        let got = next_binary(&mut fast).await;
        assert_eq!(got[..4], sent.to_be_bytes(), "the fast client's order");
        sent += 1;
    }
    let (seen, close) = within("the slow client's close", async {
        let mut seen = 0u32;
        loop {
            match slow.next().await {
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(b[..4], seen.to_be_bytes(), "the slow client's order");
                    seen += 1;
                }
                Some(Ok(Message::Close(frame))) => {
                    return (
                        seen,
                        frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                    );
                }
                Some(Ok(m)) if m.is_ping() => {}
                other => panic!("expected messages then a close, got {other:?}"),
            }
        }
    })
    .await;
    assert!(
        seen < sent,
        "the slow client got everything: {seen} of {sent}"
    );
    assert_eq!(close, Some((4008, "slow consumer".to_string())));
    let stats = stats_until(&s, "the slow client freed", |st| st.connections == 1).await;
    assert_eq!(stats.disconnects.total(), 1);
    drop((slow, fast));
    s.stop().await;
}

/// Descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the server's descriptors")
        .count()
}

/// A TLS WebSocket costs the server one descriptor, its socket: no socket pair, no pump.
/// Measured on the real binary, so the test's own sockets do not count.
#[tokio::test]
async fn a_tls_connection_costs_one_descriptor() {
    const N: usize = 50;
    let cert = certificate();
    let port = free_port();
    let args = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--tls-cert",
        &cert.tls.cert.display().to_string(),
        "--tls-key",
        &cert.tls.key.display().to_string(),
        "--shards",
        "1",
    ]
    .map(String::from)
    .to_vec();
    let node = Proc::spawn(env!("CARGO_BIN_EXE_shardcast"), args, port);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let c = &cert;
    let connect =
        move |tcp: TcpStream| async move { wss_over(tls_over(c, tcp).await, "/ws/count").await };
    // The first connection that gets through is kept: a readiness probe closed right away
    // could still hold a server descriptor when the idle count is taken.
    let tcp = within("the TLS server to listen", async {
        loop {
            if let Ok(tcp) = TcpStream::connect(addr).await {
                return tcp;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut first = connect(tcp).await;
    let idle = descriptors(node.pid());
    let mut more = Vec::new();
    for _ in 0..N {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        more.push(connect(tcp).await);
    }
    // Every one of them upgraded and subscribed: a message reaches the last.
    futures_util::SinkExt::send(&mut first, "all here".into())
        .await
        .expect("send");
    for ws in more.iter_mut() {
        assert_eq!(next_text(ws).await, "all here");
    }
    assert_eq!(
        descriptors(node.pid()) - idle,
        N,
        "descriptors for {N} TLS connections"
    );
    drop((first, more));
}

/// One server frame (unmasked) read off any stream: (opcode, payload).
async fn read_frame(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.expect("a frame header");
    let len = match h[1] & 0x7F {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).await.expect("a 16-bit length");
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).await.expect("a 64-bit length");
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.expect("a frame payload");
    (h[0] & 0x0F, payload)
}

/// A client that sends frames right behind its upgrade request, in the same TLS write: the
/// bytes hyper did not take, and those rustls had decrypted but nobody had read, are read
/// after the upgrade without waiting for more to arrive on the socket.
#[tokio::test]
async fn tls_frames_sent_with_the_upgrade_request_are_read() {
    let cert = certificate();
    let s = start(Config {
        tls: Some(cert.tls.clone()),
        max_message_bytes: 128 * 1024,
        ..config()
    })
    .await;
    let mut stream = tls_connect(&cert, &s).await;
    let big: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let mut wire = upgrade_request("GET", "/ws/early", &format!("{KEY}{V13}")).into_bytes();
    wire.extend(client_frame(true, OP_BINARY, &big));
    wire.extend(client_frame(true, OP_TEXT, b"second"));
    stream.write_all(&wire).await.expect("write");
    stream.flush().await.expect("flush");
    within("both messages back", async {
        read_101(&mut stream).await;
        assert_eq!(read_frame(&mut stream).await, (0x2, big));
        assert_eq!(read_frame(&mut stream).await, (0x1, b"second".to_vec()));
    })
    .await;
    drop(stream);
    s.stop().await;
}
