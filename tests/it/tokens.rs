//! Tokens over real sockets: `exp` enforced on open connections (close 4010 at the end of
//! the leeway, counted in `/metrics`), `--jwt-audience` and `--jwt-issuer`, and keys from a
//! JWKS endpoint served by a small HTTP server in the test, with rotation, the refetch limit
//! and the endpoint failing.
use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use shardcast::{AuthConfig, Config, DisconnectReason, JwtKey, Opcode, Secret, Topic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const SECRET: &[u8] = b"tokens-test-secret";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs256(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .expect("encode a test token")
}

fn hs256_config(audience: &[&str], issuer: &[&str]) -> Config {
    Config {
        auth: AuthConfig {
            jwt: Some(JwtKey::Hs256(Secret::new(SECRET))),
            jwt_audience: audience.iter().map(|a| a.to_string()).collect(),
            jwt_issuer: issuer.iter().map(|i| i.to_string()).collect(),
            ..AuthConfig::default()
        },
        ..config()
    }
}

/// The status of an upgrade of `/ws/t` with `token`.
async fn upgrade_status(s: &TestServer, token: &str) -> u16 {
    let req = upgrade_request(
        "GET",
        &format!("/ws/t?token={token}"),
        &format!("{KEY}{V13}"),
    );
    s.http(&req).await.0
}

/// The value of `shardcast_disconnects_total{reason="token_expired"}` in `/metrics`.
async fn expired_in_metrics(s: &TestServer) -> String {
    let (status, text) = s
        .http("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 200);
    let series = "shardcast_disconnects_total{reason=\"token_expired\"} ";
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
        .to_string()
}

#[tokio::test]
async fn an_open_connection_is_closed_with_4010_when_its_token_ends() {
    let s = start(hs256_config(&[], &[])).await;
    // Accepted within the 30 s leeway, so it ends (exp + leeway) about two seconds from now,
    // by the server's own clock (the same as the test's).
    let exp = now() - 28;
    let ending = hs256(serde_json::json!({"exp": exp, "subscribe": ["t"]}));
    let lasting = hs256(serde_json::json!({"exp": now() + 3600, "subscribe": ["t"]}));
    let mut ws = s.connect(&format!("/ws/t?token={ending}")).await;
    let mut other = s.connect(&format!("/ws/t?token={lasting}")).await;
    let opened = Instant::now();
    let frame = within("the 4010 close", close_frame(&mut ws)).await;
    assert_eq!(frame, Some((4010, "token expired".to_string())));
    // Not before the token's end: at least a second from now (exp + 30 s floored to whole
    // seconds is at least one second after the handshake).
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "{:?}",
        opened.elapsed()
    );
    assert_eq!(expired_in_metrics(&s).await, "1");
    let stats = stats_now(&s).await;
    assert_eq!(stats.disconnects.get(DisconnectReason::TokenExpired), 1);
    // The other connection is open and served.
    let t = Topic::new("t").expect("a valid topic");
    let published = s.relay.publish(&t, Opcode::Text, b"still here").await;
    assert!(published.is_ok(), "{published:?}");
    let got = within("the message", next_data(&mut other)).await;
    assert_eq!(got.to_text().expect("text"), "still here");
    // One second more past the leeway and the token is refused at the door instead.
    let late = hs256(serde_json::json!({"exp": now() - 31, "subscribe": ["t"]}));
    assert_eq!(upgrade_status(&s, &late).await, 401);
    drop((ws, other));
    s.stop().await;
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_set_and_aud_is_ignored_otherwise() {
    let exp = now() + 600;
    let token = |extra: serde_json::Value| {
        let mut claims = serde_json::json!({"exp": exp, "subscribe": ["t"]});
        let map = claims.as_object_mut().expect("an object");
        for (k, v) in extra.as_object().expect("an object") {
            map.insert(k.clone(), v.clone());
        }
        hs256(claims)
    };
    // Without --jwt-audience, a token meant for some audience is accepted.
    let s = start(hs256_config(&[], &[])).await;
    for extra in [
        serde_json::json!({"aud": "billing"}),
        serde_json::json!({"aud": ["a", "b"]}),
        serde_json::json!({"iss": "anyone"}),
    ] {
        assert_eq!(
            upgrade_status(&s, &token(extra.clone())).await,
            101,
            "{extra}"
        );
    }
    s.stop().await;

    let s = start(hs256_config(
        &["shardcast", "relay"],
        &["https://idp.example"],
    ))
    .await;
    let iss = "https://idp.example";
    for (extra, status) in [
        (serde_json::json!({"aud": "shardcast", "iss": iss}), 101),
        (serde_json::json!({"aud": "relay", "iss": iss}), 101),
        // RFC 7519: aud may be an array; one of ours is enough.
        (
            serde_json::json!({"aud": ["billing", "relay"], "iss": iss}),
            101,
        ),
        (serde_json::json!({"aud": "billing", "iss": iss}), 401),
        (serde_json::json!({"aud": ["billing"], "iss": iss}), 401),
        (serde_json::json!({"iss": iss}), 401),
        (
            serde_json::json!({"aud": "shardcast", "iss": "https://evil.example"}),
            401,
        ),
        (serde_json::json!({"aud": "shardcast"}), 401),
    ] {
        assert_eq!(
            upgrade_status(&s, &token(extra.clone())).await,
            status,
            "{extra}"
        );
    }
    s.stop().await;
}

/// What the test's JWKS endpoint answers.
#[derive(Clone)]
enum Answer {
    Keys(String),
    Unavailable,
}

/// A JWKS endpoint on loopback: answers every GET with `answer`, counting requests, until
/// `close` drops its listener.
struct JwksServer {
    port: u16,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl JwksServer {
    async fn start(keys: &[&Signer]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let answer = Arc::new(Mutex::new(Answer::Keys(key_set(keys))));
        let requests = Arc::new(AtomicUsize::new(0));
        let (a, n) = (Arc::clone(&answer), Arc::clone(&requests));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let a = Arc::clone(&a);
                let n = Arc::clone(&n);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while find(&head, b"\r\n\r\n").is_none() {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => head.extend_from_slice(&buf[..k]),
                        }
                    }
                    n.fetch_add(1, Ordering::SeqCst);
                    let answer = a.lock().expect("not poisoned").clone();
                    let (status, body) = match answer {
                        Answer::Keys(body) => ("200 OK", body),
                        Answer::Unavailable => ("503 Service Unavailable", String::new()),
                    };
                    let res = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(res.as_bytes()).await;
                });
            }
        });
        Self {
            port,
            answer,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/.well-known/jwks.json", self.port)
    }

    fn answer(&self, answer: Answer) {
        *self.answer.lock().expect("not poisoned") = answer;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops accepting: connections are refused from now on.
    async fn close(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// An ES256 signing key with a `kid`.
struct Signer {
    kid: &'static str,
    key: EncodingKey,
    jwk: Jwk,
}

impl Signer {
    fn new(kid: &'static str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ec key");
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("signing key");
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).expect("a JWK");
        jwk.common.key_id = Some(kid.to_string());
        Self { kid, key, jwk }
    }

    fn token(&self) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.to_string());
        let claims = serde_json::json!({"exp": now() + 600, "subscribe": ["t"]});
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign")
    }
}

fn key_set(keys: &[&Signer]) -> String {
    let set = JwkSet {
        keys: keys.iter().map(|s| s.jwk.clone()).collect(),
    };
    serde_json::to_string(&set).expect("a JWK set serialises")
}

fn jwks_config(url: &str, cooldown: Duration) -> Config {
    Config {
        auth: AuthConfig {
            jwt: Some(JwtKey::Jwks(url.parse().expect("a JWKS URL"))),
            jwks_cooldown: cooldown,
            ..AuthConfig::default()
        },
        ..config()
    }
}

/// The value of `shardcast_jwks_fetches_total{result=...}` in `/metrics`.
async fn jwks_fetches(s: &TestServer, result: &str) -> u64 {
    let (_, text) = s
        .http("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let series = format!("shardcast_jwks_fetches_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
        .parse()
        .expect("a count")
}

#[tokio::test]
async fn jwks_keys_rotate_refetch_at_most_once_per_cooldown_and_survive_the_endpoint_failing() {
    let (a, b, c) = (Signer::new("A"), Signer::new("B"), Signer::new("C"));
    let idp = JwksServer::start(&[&a]).await;
    // A cooldown long enough that nothing in this test waits it out by accident, short
    // enough to wait out on purpose.
    let cooldown = Duration::from_secs(5);
    let s = start(jwks_config(&idp.url(), cooldown)).await;
    // The first fetch happens before anything is served.
    assert_eq!(upgrade_status(&s, &a.token()).await, 101);
    assert_eq!(idp.requests(), 1);
    let started = Instant::now();

    // The issuer rotates to B. A token of B, once the cooldown since the first fetch is
    // over, refetches once and is accepted.
    idp.answer(Answer::Keys(key_set(&[&b])));
    tokio::time::sleep_until(started + cooldown).await;
    assert_eq!(upgrade_status(&s, &b.token()).await, 101);
    assert_eq!(idp.requests(), 2);
    let refetched = Instant::now();

    // A's kid is gone and C's was never there: within the cooldown, however many tokens
    // name them, no fetch. Checked after each upgrade that ended within the cooldown (a
    // fetch would have happened during it), so a slow machine checks fewer, never wrongly.
    let mut checked = 0;
    for _ in 0..3 {
        assert_eq!(upgrade_status(&s, &a.token()).await, 401);
        assert_eq!(upgrade_status(&s, &c.token()).await, 401);
        if refetched.elapsed() < cooldown {
            assert_eq!(idp.requests(), 2, "a fetch within the cooldown");
            checked += 1;
        }
    }
    assert!(checked > 0, "the test was too slow to tell");
    let before = idp.requests();
    assert_eq!(upgrade_status(&s, &b.token()).await, 101);
    assert_eq!(idp.requests(), before, "a known kid never fetches");

    // The endpoint fails (503): past the cooldown, C refetches once, the fetch fails, and
    // B's key stays in force.
    idp.answer(Answer::Unavailable);
    tokio::time::sleep_until(refetched + cooldown).await;
    assert_eq!(upgrade_status(&s, &c.token()).await, 401);
    assert_eq!(idp.requests(), 3);
    assert_eq!(upgrade_status(&s, &b.token()).await, 101);
    assert_eq!(jwks_fetches(&s, "error").await, 1);
    assert_eq!(jwks_fetches(&s, "ok").await, 2);

    // The endpoint goes away altogether: the same.
    let url = idp.url();
    idp.close().await;
    tokio::time::sleep(cooldown).await;
    assert_eq!(upgrade_status(&s, &c.token()).await, 401);
    assert_eq!(upgrade_status(&s, &b.token()).await, 101);
    assert_eq!(jwks_fetches(&s, "error").await, 2);
    s.stop().await;

    // A server whose JWKS cannot be fetched at start does not start.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = shardcast::Server::new(listener, jwks_config(&url, cooldown)).expect("valid");
    let err = within("the failed start", server.run(std::future::pending::<()>()))
        .await
        .expect_err("no keys, no start");
    let err = err.to_string();
    assert!(
        err.contains("--jwt-jwks-url") && err.contains("first fetch"),
        "{err}"
    );
}
