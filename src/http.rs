//! The HTTP side of the one port: routing, the WebSocket upgrade checks, `POST /publish` and
//! `/healthz`. What happens after an upgrade lives in `conn.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::conn::{self, Publish};
use crate::frame::Opcode;
use crate::relay::Relay;
use crate::shard::ConnShared;
use crate::{Error, Topic};

pub(crate) type Body = Full<Bytes>;

fn reply(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn refuse(peer: SocketAddr, status: StatusCode, why: &'static str) -> Response<Body> {
    tracing::debug!(%peer, status = status.as_u16(), why, "request refused");
    reply(status, why)
}

/// Routes one request. Never fails: every problem is an HTTP status.
pub(crate) async fn handle(
    req: Request<Incoming>,
    relay: Relay,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let res = if path == "/healthz" {
        reply(StatusCode::OK, "ok")
    } else if path == "/ws" || path.starts_with("/ws/") {
        upgrade(req, relay, peer).await
    } else if let Some(topic) = path.strip_prefix("/publish/") {
        let topic = topic.to_owned();
        publish(req, &topic, relay, peer).await
    } else {
        refuse(peer, StatusCode::NOT_FOUND, "not found\n")
    };
    Ok(res)
}

/// The topics a `/ws` request names, and whether it may publish.
fn ws_topics(req: &Request<Incoming>) -> Result<(Box<[Topic]>, Publish), &'static str> {
    if let Some(name) = req.uri().path().strip_prefix("/ws/") {
        let topic = Topic::new(name).map_err(|_| "bad topic\n")?;
        return Ok((Box::new([topic.clone()]), Publish::To(topic)));
    }
    let mut topics: Vec<Topic> = Vec::new();
    let query = req.uri().query().unwrap_or("");
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "topic" {
            let t = Topic::new(&v).map_err(|_| "bad topic\n")?;
            if !topics.contains(&t) {
                topics.push(t);
            }
        }
    }
    if topics.is_empty() {
        return Err("name a topic: /ws/{topic} or /ws?topic=a&topic=b\n");
    }
    Ok((
        topics.into_boxed_slice(),
        Publish::Refuse("publish needs a single-topic connection"),
    ))
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
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

async fn upgrade(mut req: Request<Incoming>, relay: Relay, peer: SocketAddr) -> Response<Body> {
    if req.method() != Method::GET {
        let mut res = refuse(
            peer,
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET to open a websocket\n",
        );
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return res;
    }
    let (topics, publish) = match ws_topics(&req) {
        Ok(t) => t,
        Err(why) => return refuse(peer, StatusCode::BAD_REQUEST, why),
    };
    let publish = if relay.config().client_publish {
        publish
    } else {
        Publish::Refuse("client publish is disabled on this server")
    };
    if !header_has_token(&req, header::UPGRADE, "websocket")
        || !header_has_token(&req, header::CONNECTION, "upgrade")
    {
        let mut res = refuse(
            peer,
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint needs a websocket upgrade\n",
        );
        res.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return res;
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut res = refuse(
            peer,
            StatusCode::UPGRADE_REQUIRED,
            "unsupported websocket version\n",
        );
        res.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return res;
    }
    if !req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .is_some_and(|k| valid_key(k.as_bytes()))
    {
        return refuse(
            peer,
            StatusCode::BAD_REQUEST,
            "missing or malformed sec-websocket-key\n",
        );
    }
    let Some(permit) = relay.try_admit() else {
        return refuse(
            peer,
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached\n",
        );
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(r) => r,
        Err(_) => return refuse(peer, StatusCode::BAD_REQUEST, "bad websocket handshake\n"),
    };
    let conn = Arc::new(ConnShared::default());
    let slot = match relay.reserve(topics, Arc::clone(&conn), permit).await {
        Ok(slot) => slot,
        Err(_) => return refuse(peer, StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    };
    tracing::debug!(%peer, shard = slot.shard, id = slot.id, "websocket opened");
    tokio::spawn(conn::serve(relay, slot, conn, publish, fut));
    response.map(|_| Full::new(Bytes::new()))
}

/// `Content-Type` values that make a text frame.
fn is_text(req: &Request<Incoming>) -> bool {
    let Some(ct) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime.starts_with("text/") || mime == "application/json"
}

async fn publish(
    req: Request<Incoming>,
    topic: &str,
    relay: Relay,
    peer: SocketAddr,
) -> Response<Body> {
    if req.method() != Method::POST {
        let mut res = refuse(
            peer,
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST to publish\n",
        );
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return res;
    }
    let Ok(topic) = Topic::new(topic) else {
        return refuse(peer, StatusCode::BAD_REQUEST, "bad topic\n");
    };
    let max = relay.config().max_message_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return refuse(peer, StatusCode::PAYLOAD_TOO_LARGE, "message too big\n");
    }
    let opcode = if is_text(&req) {
        Opcode::Text
    } else {
        Opcode::Binary
    };
    // Reads at most `max` bytes (plus one chunk) before giving up: the rest is never buffered.
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return refuse(peer, StatusCode::PAYLOAD_TOO_LARGE, "message too big\n");
        }
        Err(_) => return refuse(peer, StatusCode::BAD_REQUEST, "failed to read the body\n"),
    };
    if opcode == Opcode::Text && simdutf8::basic::from_utf8(&body).is_err() {
        return refuse(
            peer,
            StatusCode::BAD_REQUEST,
            "text body is not valid utf-8\n",
        );
    }
    match relay.publish(&topic, opcode, &body).await {
        Ok(_) => reply(StatusCode::ACCEPTED, "queued\n"),
        Err(Error::ShuttingDown) => {
            refuse(peer, StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        }
        Err(Error::MessageTooLarge { .. }) => {
            refuse(peer, StatusCode::PAYLOAD_TOO_LARGE, "message too big\n")
        }
        Err(_) => refuse(peer, StatusCode::INTERNAL_SERVER_ERROR, "publish failed\n"),
    }
}
