//! Feeds arbitrary tokens to `Auth::verify` (HS256) and checks that a token is accepted only
//! when it is valid.
//!
//! Input layout: byte 0 picks a mode, the rest is its data.
//! - mode 0: the data is the token string as is. Acceptance requires a correct signature,
//!   which is checked here independently with `hmac`.
//! - mode 1: the data is the claims JSON, signed here with the server's key. The grants of an
//!   accepted token must equal the claims' `subscribe` and `publish` arrays, and `exp` must
//!   be a number not in the past, read as the grants' `exp` (a fraction rounded); simple claims (a future integer `exp`, string arrays),
//!   re-encoded, must be accepted.
//! - mode 2: a valid signed token with one byte replaced at a data-chosen position: any token
//!   that differs from the original must be refused.
#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sha2::Sha256;
use shardcast_server::auth::{Auth, JWT_LEEWAY_SECS, TopicPattern};
use shardcast_server::{AuthConfig, JwtKey, Secret};

const KEY: &[u8] = b"fuzz-secret";
const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

fn auth() -> &'static Auth {
    static A: OnceLock<Auth> = OnceLock::new();
    A.get_or_init(|| {
        Auth::new(&AuthConfig {
            jwt: Some(JwtKey::Hs256(Secret::new(KEY))),
            ..AuthConfig::default()
        })
        .expect("a valid auth config")
    })
}

fn mac(signing_input: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(KEY).expect("hmac takes any key length");
    m.update(signing_input);
    m.finalize().into_bytes().to_vec()
}

fn sign(claims: &[u8]) -> String {
    let input = format!("{}.{}", B64.encode(HEADER), B64.encode(claims));
    let sig = B64.encode(mac(input.as_bytes()));
    format!("{input}.{sig}")
}

fn signature_ok(token: &str) -> bool {
    let Some((input, sig)) = token.rsplit_once('.') else {
        return false;
    };
    B64.decode(sig).is_ok_and(|s| s == mac(input.as_bytes()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The claims as the relay reads them.
#[derive(serde::Deserialize)]
struct Model {
    exp: Option<Value>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

fn patterns(v: Option<&Value>) -> Option<Vec<TopicPattern>> {
    match v {
        None => Some(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(TopicPattern::parse))
            .collect(),
        Some(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let Ok(token) = std::str::from_utf8(data) else {
                return;
            };
            if auth().verify(token).is_ok() {
                assert!(signature_ok(token), "accepted a token with a bad signature");
            }
        }
        1 => {
            let token = sign(data);
            let result = auth().verify(&token);
            if let Ok(grants) = &result {
                // Read the way jsonwebtoken reads them: serde skips unknown fields without
                // checking their strings, so a strict parse of the whole payload may fail.
                let m: Model = serde_json::from_slice(data).expect("accepted unreadable claims");
                let whole = m.exp.as_ref().and_then(Value::as_u64);
                let exp = m.exp.as_ref().and_then(Value::as_f64);
                let exp = exp.expect("accepted a token without a numeric exp");
                // The close time of the connection comes from it.
                let read = whole.unwrap_or_else(|| exp.round() as u64);
                assert_eq!(grants.exp, read, "exp read differently from the validation");
                assert!(
                    exp + JWT_LEEWAY_SECS as f64 >= now() as f64,
                    "accepted an expired token"
                );
                let pats =
                    |v: &[String]| v.iter().map(|p| TopicPattern::parse(p)).collect::<Vec<_>>();
                assert_eq!(grants.subscribe.to_vec(), pats(&m.subscribe));
                assert_eq!(grants.publish.to_vec(), pats(&m.publish));
            }
            let claims: Option<serde_json::Map<String, Value>> = serde_json::from_slice(data).ok();
            // Plain claims: an integer exp in the future and string arrays, nothing else.
            if let Some(c) = &claims {
                let simple = c.iter().all(|(k, v)| match k.as_str() {
                    "exp" => v.as_u64().is_some_and(|e| e > now() + 60 && e < 1 << 52),
                    "subscribe" | "publish" => patterns(Some(v)).is_some(),
                    _ => false,
                });
                if simple && c.contains_key("exp") {
                    // Re-encoded, so duplicate keys (which serde refuses) are gone.
                    let canonical = serde_json::to_vec(c).expect("a map serialises");
                    let again = auth().verify(&sign(&canonical));
                    assert!(again.is_ok(), "refused valid claims: {again:?}");
                }
            }
        }
        _ => {
            let Some((&at, data)) = data.split_first() else {
                return;
            };
            let Some((&byte, claims)) = data.split_first() else {
                return;
            };
            let claims = if claims.is_empty() {
                format!(r#"{{"exp":{},"subscribe":["a"]}}"#, now() + 3600).into_bytes()
            } else {
                claims.to_vec()
            };
            let original = sign(&claims);
            let mut bytes = original.clone().into_bytes();
            let i = at as usize % bytes.len();
            bytes[i] = byte;
            let Ok(changed) = String::from_utf8(bytes) else {
                return;
            };
            if changed != original {
                assert!(
                    auth().verify(&changed).is_err(),
                    "accepted a tampered token"
                );
            }
        }
    }
});
