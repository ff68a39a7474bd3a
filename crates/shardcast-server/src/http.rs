//! The I/O half of request handling: acts on the checks of `handshake.rs`, admits WebSocket
//! connections against the connection limits, performs the upgrade, and serves
//! `POST /publish`, `/metrics` and the health checks. What happens after an upgrade lives in `conn.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::Error;
use crate::frame::Opcode;
use crate::handshake::{self, Policy, RejectReason, Rejection, Route};
use shardcast_core::{ConnShared, Source};

use crate::relay::Relay;

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

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// Everything, including `/metrics` unless it has its own listener.
    Main,
    /// `--metrics-listen`: `/metrics` and the health checks only.
    Metrics,
}

/// Counts, logs at debug and answers a refusal.
fn refuse(relay: &Relay, peer: SocketAddr, r: Rejection) -> Response<Body> {
    relay.reject(r.reason);
    tracing::debug!(%peer, status = r.status.as_u16(), reason = r.reason.as_str(), "request refused");
    let mut res = reply(r.status, r.message);
    if let Some((name, value)) = r.header {
        res.headers_mut().insert(name, value);
    }
    res
}

fn policy(relay: &Relay) -> Policy<'_> {
    let config = relay.config();
    Policy {
        auth: relay.auth(),
        client_publish: config.client_publish,
        max_message_bytes: config.max_message_bytes,
    }
}

fn shutting_down() -> Rejection {
    Rejection::new(
        StatusCode::SERVICE_UNAVAILABLE,
        RejectReason::ShuttingDown,
        "shutting down\n",
    )
}

/// Routes one request. Never fails: every problem is an HTTP status.
pub(crate) async fn handle(
    req: Request<Incoming>,
    relay: Relay,
    peer: SocketAddr,
    endpoint: Endpoint,
) -> Result<Response<Body>, Infallible> {
    let metrics_here = endpoint == Endpoint::Metrics || relay.config().metrics_listen.is_none();
    let res = match handshake::route(req.uri().path()) {
        Route::Live => reply(StatusCode::OK, "ok"),
        Route::Ready if relay.is_draining() => reply(StatusCode::SERVICE_UNAVAILABLE, "draining"),
        Route::Ready => reply(StatusCode::OK, "ready"),
        Route::Metrics if metrics_here => metrics(&relay).await,
        Route::Ws if endpoint == Endpoint::Main => upgrade(req, relay, peer).await,
        Route::Publish(topic) if endpoint == Endpoint::Main => {
            let topic = topic.to_owned();
            publish(req, &topic, relay, peer).await
        }
        Route::Demo(path) if endpoint == Endpoint::Main && relay.serves_demo() => {
            demo(&req, path, &relay, peer)
        }
        _ => refuse(
            &relay,
            peer,
            Rejection::new(StatusCode::NOT_FOUND, RejectReason::NotFound, "not found\n"),
        ),
    };
    Ok(res)
}

/// A file of the browser demo, for `GET` or `HEAD`.
fn demo(req: &Request<Incoming>, path: &str, relay: &Relay, peer: SocketAddr) -> Response<Body> {
    let Some((content_type, body)) = crate::demo::asset(path) else {
        let r = Rejection::new(StatusCode::NOT_FOUND, RejectReason::NotFound, "not found\n");
        return refuse(relay, peer, r);
    };
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        let r = Rejection::new(
            StatusCode::METHOD_NOT_ALLOWED,
            RejectReason::MethodNotAllowed,
            "use GET\n",
        );
        return refuse(relay, peer, r);
    }
    let body = if req.method() == hyper::Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from_static(body.as_bytes())
    };
    let mut res = Response::new(Full::new(body));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(crate::demo::CONTENT_SECURITY_POLICY),
    );
    res
}

async fn metrics(relay: &Relay) -> Response<Body> {
    let text = crate::metrics::render(relay.stats().await);
    let mut res = Response::new(Full::new(Bytes::from(text)));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    res
}

/// With `--jwt-jwks-url`, fetches the JWKS again if the request's token names a key it
/// lacks (rate-limited), so the checks that follow know a key rotated in since.
async fn await_key(req: &Request<Incoming>, relay: &Relay) {
    let token = handshake::token(req.uri(), req.headers());
    relay.auth().await_key(token.as_deref()).await;
}

/// The instant of the runtime's clock at which `at` (wall clock) comes; `None` if it is too
/// far away to represent.
fn instant_of(at: SystemTime) -> Option<tokio::time::Instant> {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::Instant::now().checked_add(left)
}

async fn upgrade(mut req: Request<Incoming>, relay: Relay, peer: SocketAddr) -> Response<Body> {
    await_key(&req, &relay).await;
    let checked = handshake::check_upgrade(req.method(), req.uri(), req.headers(), policy(&relay));
    let handshake::Upgrade {
        topics,
        publish,
        valid_until,
    } = match checked {
        Ok(u) => u,
        Err(r) => return refuse(&relay, peer, r),
    };
    let admission = match relay.try_admit(peer.ip()) {
        Ok(a) => a,
        Err(why) => {
            let (status, message) = match why {
                RejectReason::PerIpLimit => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections from this address\n",
                ),
                _ => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "connection limit reached\n",
                ),
            };
            return refuse(&relay, peer, Rejection::new(status, why, message));
        }
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(r) => r,
        Err(_) => {
            let r = Rejection::new(
                StatusCode::BAD_REQUEST,
                RejectReason::BadKey,
                "bad websocket handshake\n",
            );
            return refuse(&relay, peer, r);
        }
    };
    let conn = Arc::new(ConnShared::default());
    let expires = valid_until.and_then(instant_of);
    let slot = match relay
        .reserve(topics, Arc::clone(&conn), admission, expires)
        .await
    {
        Ok(slot) => slot,
        Err(_) => return refuse(&relay, peer, shutting_down()),
    };
    tracing::debug!(%peer, shard = slot.shard(), id = slot.id(), "websocket opened");
    tokio::spawn(crate::conn::serve(relay, slot, conn, publish, peer, fut));
    response.map(|_| Full::new(Bytes::new()))
}

async fn publish(
    req: Request<Incoming>,
    topic: &str,
    relay: Relay,
    peer: SocketAddr,
) -> Response<Body> {
    await_key(&req, &relay).await;
    let checked = handshake::check_publish(
        req.method(),
        req.uri(),
        topic,
        req.headers(),
        policy(&relay),
    );
    let handshake::PublishRequest { topic, opcode } = match checked {
        Ok(p) => p,
        Err(r) => return refuse(&relay, peer, r),
    };
    let max = relay.config().max_message_bytes;
    // Reads at most `max` bytes (plus one chunk) before giving up: the rest is never buffered.
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return refuse(&relay, peer, handshake::too_large());
        }
        Err(_) => {
            let r = Rejection::new(
                StatusCode::BAD_REQUEST,
                RejectReason::BadBody,
                "failed to read the body\n",
            );
            return refuse(&relay, peer, r);
        }
    };
    if opcode == Opcode::Text && simdutf8::basic::from_utf8(&body).is_err() {
        let r = Rejection::new(
            StatusCode::BAD_REQUEST,
            RejectReason::BadBody,
            "text body is not valid utf-8\n",
        );
        return refuse(&relay, peer, r);
    }
    match relay
        .publish_from(Source::Http, &topic, opcode, &body)
        .await
    {
        Ok(_) => reply(StatusCode::ACCEPTED, "queued\n"),
        Err(Error::MessageTooLarge { .. }) => refuse(&relay, peer, handshake::too_large()),
        Err(_) => refuse(&relay, peer, shutting_down()),
    }
}
