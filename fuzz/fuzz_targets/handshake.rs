//! Feeds arbitrary request bytes through routing, topic and query parsing, the upgrade and
//! publish header checks and token extraction (`shardcast_server::handshake`), under an open and a
//! locked-down policy.
//!
//! The bytes are parsed as an HTTP/1.1 request head the way hyper does (httparse); requests
//! hyper would refuse before routing are skipped. Invariants checked:
//! - no panic;
//! - an accepted upgrade is a GET naming at least one valid topic, and a publishing
//!   connection names exactly its one topic;
//! - under the locked policy, nothing is accepted without a credential;
//! - every refusal has a status from the documented set, with its required header.
#![no_main]

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use libfuzzer_sys::fuzz_target;
use shardcast_server::auth::Auth;
use shardcast_server::handshake::{self, Policy, Publish, RejectReason, Route};
use shardcast_server::{AuthConfig, JwtKey, Secret, Topic};

struct Policies {
    open: Auth,
    locked: Auth,
}

fn policies() -> &'static Policies {
    static P: OnceLock<Policies> = OnceLock::new();
    P.get_or_init(|| Policies {
        open: Auth::new(&AuthConfig::default()).expect("the default auth config is valid"),
        locked: Auth::new(&AuthConfig {
            jwt: Some(JwtKey::Hs256(Secret::new(b"fuzz-secret".as_slice()))),
            api_keys: vec![Secret::new(b"key".as_slice())],
            allowed_origins: vec!["https://*.example.com".into(), "http://a.b".into()],
            ..AuthConfig::default()
        })
        .expect("the locked auth config is valid"),
    })
}

/// The request head as hyper would hand it over, or `None` where hyper refuses it first.
fn parse(data: &[u8]) -> Option<(Method, Uri, HeaderMap)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = req.parse(data).ok()? else {
        return None;
    };
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let uri = Uri::try_from(req.path?).ok()?;
    let mut map = HeaderMap::new();
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        map.append(name, value);
    }
    Some((method, uri, map))
}

fn check_refusal(r: &handshake::Rejection, allowed: &[u16]) {
    assert!(
        allowed.contains(&r.status.as_u16()),
        "unexpected status {} for {:?}",
        r.status,
        r.reason
    );
    match r.status {
        StatusCode::UNAUTHORIZED => {
            assert_eq!(r.reason, RejectReason::Unauthorized);
            assert!(matches!(&r.header, Some((n, _)) if n == http::header::WWW_AUTHENTICATE));
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            assert!(matches!(&r.header, Some((n, _)) if n == http::header::ALLOW));
        }
        StatusCode::UPGRADE_REQUIRED if r.reason == RejectReason::BadVersion => {
            assert!(matches!(&r.header, Some((n, v))
                if n == http::header::SEC_WEBSOCKET_VERSION && v == "13"));
        }
        _ => {}
    }
    assert!(!r.message.is_empty());
}

fn valid(topic: &Topic) -> bool {
    Topic::new(topic.as_str()).is_ok_and(|t| &t == topic)
}

fuzz_target!(|data: &[u8]| {
    let Some((method, uri, headers)) = parse(data) else {
        return;
    };
    let token = handshake::token(&uri, &headers);
    let p = policies();
    for (auth, client_publish, locked) in [
        (&p.open, true, false),
        (&p.open, false, false),
        (&p.locked, true, true),
    ] {
        let policy = Policy {
            auth,
            client_publish,
            max_message_bytes: 1024,
        };
        match handshake::route(uri.path()) {
            Route::Live | Route::Ready | Route::Metrics | Route::NotFound => {}
            // Only the demo's own paths route there: `/`, `/index.html` and its two files.
            Route::Demo(path) => {
                assert!(["/", "/index.html", "/demo.css", "/demo.js"].contains(&path));
                assert_eq!(path, uri.path());
            }
            Route::Ws => match handshake::check_upgrade(&method, &uri, &headers, policy) {
                Ok(u) => {
                    assert_eq!(method, Method::GET);
                    assert!(!u.topics.is_empty());
                    assert!(u.topics.iter().all(valid));
                    if let Publish::To(t) = &u.publish {
                        assert!(client_publish);
                        assert_eq!(&*u.topics, std::slice::from_ref(t));
                    }
                    if locked {
                        assert!(token.is_some(), "accepted without a token");
                    }
                }
                Err(r) => check_refusal(&r, &[400, 401, 403, 405, 426]),
            },
            Route::Publish(raw) => {
                match handshake::check_publish(&method, &uri, raw, &headers, policy) {
                    Ok(req) => {
                        assert_eq!(method, Method::POST);
                        assert!(valid(&req.topic));
                        assert_eq!(req.topic.as_str(), raw);
                        if locked {
                            assert!(token.is_some(), "accepted without a credential");
                        }
                    }
                    Err(r) => check_refusal(&r, &[400, 401, 403, 405, 413]),
                }
            }
        }
    }
});
