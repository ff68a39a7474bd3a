//! The pure half of request handling: routing, topic and query parsing, upgrade header checks,
//! token extraction and access decisions, each refusal with its HTTP status.
//!
//! Nothing here does I/O or touches shared state, so the `handshake` fuzz target drives it
//! directly. Admission (connection limits), the upgrade itself and publishing live in
//! `http.rs`.

use std::borrow::Cow;
use std::time::SystemTime;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode, Uri};

use crate::Topic;
use crate::auth::{Auth, Denied};
use crate::frame::Opcode;
pub use crate::reject::RejectReason;

/// Where a request goes, by path alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/livez`, and its alias `/healthz`.
    Live,
    /// `/readyz`.
    Ready,
    /// `/metrics`.
    Metrics,
    /// `/ws/{topic}` or `/ws?topic=..`.
    Ws,
    /// `/publish/{topic}`, with the raw topic.
    Publish(&'a str),
    /// `/` and the files of the browser demo page (`demo.rs`), by path.
    Demo(&'a str),
    NotFound,
}

pub fn route(path: &str) -> Route<'_> {
    if path == "/livez" || path == "/healthz" {
        Route::Live
    } else if path == "/readyz" {
        Route::Ready
    } else if path == "/metrics" {
        Route::Metrics
    } else if path == "/ws" || path.starts_with("/ws/") {
        Route::Ws
    } else if let Some(topic) = path.strip_prefix("/publish/") {
        Route::Publish(topic)
    } else if crate::demo::asset(path).is_some() {
        Route::Demo(path)
    } else {
        Route::NotFound
    }
}

/// A refusal: its status, its reason, the body text and at most one extra header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: RejectReason,
    pub message: &'static str,
    pub header: Option<(HeaderName, HeaderValue)>,
}

impl Rejection {
    pub fn new(status: StatusCode, reason: RejectReason, message: &'static str) -> Self {
        Self {
            status,
            reason,
            message,
            header: None,
        }
    }

    fn with_header(mut self, name: HeaderName, value: &'static str) -> Self {
        self.header = Some((name, HeaderValue::from_static(value)));
        self
    }

    fn denied(d: Denied) -> Self {
        match d {
            Denied::Missing => Self::new(
                StatusCode::UNAUTHORIZED,
                RejectReason::Unauthorized,
                "missing token\n",
            ),
            Denied::Invalid => Self::new(
                StatusCode::UNAUTHORIZED,
                RejectReason::Unauthorized,
                "invalid token\n",
            ),
            Denied::Expired => Self::new(
                StatusCode::UNAUTHORIZED,
                RejectReason::Unauthorized,
                "expired token\n",
            ),
            Denied::NotGranted => {
                return Self::new(
                    StatusCode::FORBIDDEN,
                    RejectReason::Forbidden,
                    "topic not granted\n",
                );
            }
        }
        .with_header(header::WWW_AUTHENTICATE, "Bearer")
    }

    fn method(allow: &'static str, message: &'static str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            RejectReason::MethodNotAllowed,
            message,
        )
        .with_header(header::ALLOW, allow)
    }

    fn bad_topic() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            RejectReason::BadTopic,
            "bad topic\n",
        )
    }
}

/// What a WebSocket connection may do with the data messages it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    /// Publish to this topic (a `/ws/{topic}` connection).
    To(Topic),
    /// Refuse with close 1008 and this reason.
    Refuse(&'static str),
}

/// An accepted upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub topics: Box<[Topic]>,
    pub publish: Publish,
    /// When the token stops being valid: the connection is closed with 4010 then. `None`
    /// without a token.
    pub valid_until: Option<SystemTime>,
}

/// Settings the checks need.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    pub auth: &'a Auth,
    pub client_publish: bool,
    pub max_message_bytes: usize,
}

/// The bearer token of a request: `Authorization: Bearer ...` first, then `?token=`.
pub fn token<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<Cow<'a, str>> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, rest) = v.trim().split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| Cow::Borrowed(rest.trim()));
    }
    let query = uri.query()?;
    form_urlencoded::parse(query.as_bytes()).find_map(|(k, v)| (k == "token").then_some(v))
}

/// The topics a `/ws` request names, and what its data messages do.
fn ws_topics(uri: &Uri) -> Result<(Box<[Topic]>, Publish), Rejection> {
    if let Some(name) = uri.path().strip_prefix("/ws/") {
        let topic = Topic::new(name).map_err(|_| Rejection::bad_topic())?;
        return Ok((Box::new([topic.clone()]), Publish::To(topic)));
    }
    let mut topics: Vec<Topic> = Vec::new();
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        if k == "topic" {
            let t = Topic::new(&v).map_err(|_| Rejection::bad_topic())?;
            if !topics.contains(&t) {
                topics.push(t);
            }
        }
    }
    if topics.is_empty() {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            RejectReason::BadTopic,
            "name a topic: /ws/{topic} or /ws?topic=a&topic=b\n",
        ));
    }
    Ok((
        topics.into_boxed_slice(),
        Publish::Refuse("publish needs a single-topic connection"),
    ))
}

fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A `Sec-WebSocket-Key` must be the base64 of 16 bytes (RFC 6455 §4.1).
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// Checks a `/ws` request, in the order a client can fix them: method, topic, upgrade
/// headers, origin, credential, grants.
pub fn check_upgrade(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    policy: Policy<'_>,
) -> Result<Upgrade, Rejection> {
    if method != Method::GET {
        return Err(Rejection::method("GET", "use GET to open a websocket\n"));
    }
    let (topics, publish) = ws_topics(uri)?;
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return Err(Rejection::new(
            StatusCode::UPGRADE_REQUIRED,
            RejectReason::NotWebSocket,
            "this endpoint needs a websocket upgrade\n",
        )
        .with_header(header::UPGRADE, "websocket"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(Rejection::new(
            StatusCode::UPGRADE_REQUIRED,
            RejectReason::BadVersion,
            "unsupported websocket version\n",
        )
        .with_header(header::SEC_WEBSOCKET_VERSION, "13"));
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key_ok = keys.next().is_some_and(|k| valid_key(k.as_bytes())) && keys.next().is_none();
    if !key_ok {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            RejectReason::BadKey,
            "missing or malformed sec-websocket-key\n",
        ));
    }
    let origin = headers.get(header::ORIGIN).map(HeaderValue::as_bytes);
    if !policy.auth.origin_allowed(origin) {
        return Err(Rejection::new(
            StatusCode::FORBIDDEN,
            RejectReason::Origin,
            "origin not allowed\n",
        ));
    }
    let access = policy
        .auth
        .subscriber(token(uri, headers).as_deref())
        .map_err(Rejection::denied)?;
    if !topics.iter().all(|t| access.can_subscribe(t)) {
        return Err(Rejection::denied(Denied::NotGranted));
    }
    let publish = match publish {
        _ if !policy.client_publish => Publish::Refuse("client publish is disabled on this server"),
        Publish::To(t) if !access.can_publish(&t) => {
            Publish::Refuse("token grants no publish right for this topic")
        }
        p => p,
    };
    Ok(Upgrade {
        topics,
        publish,
        valid_until: access.valid_until(),
    })
}

/// An accepted `POST /publish/{topic}` request, before its body is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest {
    pub topic: Topic,
    pub opcode: Opcode,
}

/// `Content-Type` values that make a text frame.
fn is_text(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct.split(';').next().unwrap_or("").trim();
    mime.get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("text/"))
        || mime.eq_ignore_ascii_case("application/json")
}

/// Checks a `/publish/{topic}` request: method, topic, credential, declared length.
pub fn check_publish(
    method: &Method,
    uri: &Uri,
    raw_topic: &str,
    headers: &HeaderMap,
    policy: Policy<'_>,
) -> Result<PublishRequest, Rejection> {
    if method != Method::POST {
        return Err(Rejection::method("POST", "use POST to publish\n"));
    }
    let topic = Topic::new(raw_topic).map_err(|_| Rejection::bad_topic())?;
    policy
        .auth
        .publisher(token(uri, headers).as_deref(), &topic)
        .map_err(Rejection::denied)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > policy.max_message_bytes as u64) {
        return Err(too_large());
    }
    let opcode = if is_text(headers) {
        Opcode::Text
    } else {
        Opcode::Binary
    };
    Ok(PublishRequest { topic, opcode })
}

pub(crate) fn too_large() -> Rejection {
    Rejection::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        RejectReason::TooLarge,
        "message too big\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthConfig, JwtKey, Secret};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        h
    }

    const UPGRADE: &[(&str, &str)] = &[
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    fn policy(auth: &Auth) -> Policy<'_> {
        Policy {
            auth,
            client_publish: true,
            max_message_bytes: 1024,
        }
    }

    #[test]
    fn tokens_come_from_the_header_before_the_query() {
        let uri: Uri = "/ws/a?token=q%20t".parse().expect("uri");
        assert_eq!(token(&uri, &HeaderMap::new()).as_deref(), Some("q t"));
        let h = headers(&[("authorization", "Bearer  abc ")]);
        assert_eq!(token(&uri, &h).as_deref(), Some("abc"));
        let h = headers(&[("authorization", "Basic abc")]);
        assert_eq!(token(&uri, &h), None);
    }

    #[test]
    fn a_token_without_the_topic_is_forbidden_and_without_publish_refuses_data() {
        let secret = b"k".to_vec();
        let auth = Auth::new(&AuthConfig {
            jwt: Some(JwtKey::Hs256(Secret::new(secret.clone()))),
            ..AuthConfig::default()
        })
        .expect("auth");
        let claims = serde_json::json!({
            "exp": jsonwebtoken::get_current_timestamp() + 60,
            "subscribe": ["news.*"],
        });
        let jwt = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .expect("token");
        let get = |path: String| {
            let uri: Uri = path.parse().expect("uri");
            check_upgrade(&Method::GET, &uri, &headers(UPGRADE), policy(&auth))
        };
        assert_eq!(
            get("/ws/news.a".into()).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        let ok = get(format!("/ws/news.a?token={jwt}")).expect("granted");
        assert!(matches!(ok.publish, Publish::Refuse(_)));
        assert_eq!(
            get(format!("/ws/chat?token={jwt}")).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            get(format!("/ws?topic=news.a&topic=chat&token={jwt}"))
                .unwrap_err()
                .status,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let auth = Auth::new(&AuthConfig::default()).expect("auth");
        let mut h = headers(UPGRADE);
        h.append(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        let uri: Uri = "/ws/a".parse().expect("uri");
        let err = check_upgrade(&Method::GET, &uri, &h, policy(&auth)).unwrap_err();
        assert_eq!(err.reason, RejectReason::BadKey);
    }
}
