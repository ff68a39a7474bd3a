//! Access control: JWT verification, API keys, topic grants and the origin allowlist.
//!
//! This file decides *whether* a request may do something. Which HTTP status a refusal gets,
//! and where the token comes from, is decided in `handshake.rs`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, JwtKey};
use crate::jwks::{Jwks, JwksStats, Key};
use crate::{Error, Topic};

/// Seconds of clock skew tolerated on `exp` and `nbf`. An open connection is closed when its
/// token would no longer be accepted by a new handshake: `exp` plus this.
pub const JWT_LEEWAY_SECS: u64 = 30;

/// A topic pattern from a token: an exact name, or a prefix ending in `*` (`prices.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicPattern {
    Exact(Box<str>),
    /// Matches every topic that starts with this (possibly empty) prefix.
    Prefix(Box<str>),
}

impl TopicPattern {
    pub fn parse(s: &str) -> Self {
        match s.strip_suffix('*') {
            Some(prefix) => Self::Prefix(prefix.into()),
            None => Self::Exact(s.into()),
        }
    }

    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Self::Exact(name) => **name == *topic,
            Self::Prefix(prefix) => topic.starts_with(&**prefix),
        }
    }
}

/// What a verified token allows, and until when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub subscribe: Box<[TopicPattern]>,
    pub publish: Box<[TopicPattern]>,
    /// The token's `exp`, in seconds since the Unix epoch.
    pub exp: u64,
}

impl Grants {
    /// When the token stops being accepted: `exp` plus [`JWT_LEEWAY_SECS`]. `None` if that
    /// is past what the clock can represent (the token never expires in practice).
    pub fn valid_until(&self) -> Option<SystemTime> {
        let secs = self.exp.checked_add(JWT_LEEWAY_SECS)?;
        UNIX_EPOCH.checked_add(Duration::from_secs(secs))
    }

    pub fn can_subscribe(&self, topic: &Topic) -> bool {
        self.subscribe.iter().any(|p| p.matches(topic.as_str()))
    }

    pub fn can_publish(&self, topic: &Topic) -> bool {
        self.publish.iter().any(|p| p.matches(topic.as_str()))
    }
}

/// Why a credential was refused. Each maps to one HTTP status in `handshake.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("missing credential")]
    Missing,
    #[error("invalid credential")]
    Invalid,
    #[error("expired token")]
    Expired,
    #[error("topic not granted")]
    NotGranted,
}

/// A NumericDate as jsonwebtoken's validation reads it: whole seconds, or a fraction it
/// rounds.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumericDate {
    Whole(u64),
    Fraction(f64),
}

impl NumericDate {
    fn secs(&self) -> u64 {
        match *self {
            Self::Whole(n) => n,
            // The validation has refused what is negative or not finite; `as` saturates.
            Self::Fraction(f) => f.round() as u64,
        }
    }
}

/// The claims shardcast reads. `exp` is required by the validation (so it is here once a
/// token passes it); `aud` and `iss` are checked by the validation; unknown claims are
/// ignored.
#[derive(Deserialize)]
struct Claims {
    exp: NumericDate,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// Where the keys that verify tokens come from.
enum Jwt {
    /// One key from the configuration (boxed: a `Validation` is large, an `Arc` is not).
    Fixed(Box<Key>),
    /// Keys from a JWKS endpoint, chosen by the token's `kid`.
    Jwks(Arc<Jwks>),
}

/// A `/ws` request's access once its credential is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// No JWT is configured: every topic may be subscribed and published.
    Open,
    /// Only what the token grants.
    Granted(Grants),
}

impl Access {
    /// When the access ends (the token's [`Grants::valid_until`]); `None`: never.
    pub fn valid_until(&self) -> Option<SystemTime> {
        match self {
            Self::Open => None,
            Self::Granted(g) => g.valid_until(),
        }
    }

    pub fn can_subscribe(&self, topic: &Topic) -> bool {
        match self {
            Self::Open => true,
            Self::Granted(g) => g.can_subscribe(topic),
        }
    }

    pub fn can_publish(&self, topic: &Topic) -> bool {
        match self {
            Self::Open => true,
            Self::Granted(g) => g.can_publish(topic),
        }
    }
}

/// The SHA-256 digest of an API key: what a presented credential is compared against.
type KeyDigest = [u8; 32];

fn key_digest(key: &[u8]) -> KeyDigest {
    Sha256::digest(key).into()
}

/// The checks built from an [`AuthConfig`]: keys parsed once at start.
pub struct Auth {
    jwt: Option<Jwt>,
    /// Digests only: comparing fixed-length digests tells an attacker nothing about a key's
    /// length, which `ct_eq` on the keys themselves would (it returns early on a length
    /// mismatch).
    api_keys: Box<[KeyDigest]>,
    origins: Box<[OriginPattern]>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("jwt", &self.jwt.is_some())
            .field("api_keys", &self.api_keys.len())
            .field("origins", &self.origins)
            .finish()
    }
}

impl Auth {
    /// Parses keys and origin patterns; a bad one is a configuration error naming its flag.
    pub fn new(config: &AuthConfig) -> Result<Self, Error> {
        let jwt = config
            .jwt
            .as_ref()
            .map(|key| jwt_from(key, config))
            .transpose()?;
        if jwt.is_none() {
            for (flag, set) in [
                ("--jwt-audience", &config.jwt_audience),
                ("--jwt-issuer", &config.jwt_issuer),
            ] {
                if !set.is_empty() {
                    return Err(Error::Config(format!(
                        "{flag} needs a JWT key (--jwt-secret, --jwt-public-key or --jwt-jwks-url)"
                    )));
                }
            }
        }
        if config.api_keys.iter().any(|k| k.expose().is_empty()) {
            return Err(Error::Config("--api-key must not be empty".into()));
        }
        let origins = config
            .allowed_origins
            .iter()
            .map(|o| OriginPattern::parse(o))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            jwt,
            api_keys: config
                .api_keys
                .iter()
                .map(|k| key_digest(k.expose()))
                .collect(),
            origins,
        })
    }

    /// With `--jwt-jwks-url`: the first fetch of the key set, which must succeed, then its
    /// periodic refresh in a task of its own. Without: nothing.
    pub async fn start(&self) -> Result<(), Error> {
        match &self.jwt {
            Some(Jwt::Jwks(jwks)) => jwks.start().await.map_err(|reason| Error::Jwks {
                url: jwks.url().to_string(),
                reason,
            }),
            _ => Ok(()),
        }
    }

    /// The JWKS fetch counters (`None` without `--jwt-jwks-url`).
    pub fn jwks_stats(&self) -> Option<JwksStats> {
        match &self.jwt {
            Some(Jwt::Jwks(jwks)) => Some(jwks.stats()),
            _ => None,
        }
    }

    /// Before a request's token is checked: with `--jwt-jwks-url`, a token whose `kid` the
    /// key set lacks refetches the set (at most once per `--jwt-jwks-cooldown`), so a key
    /// the issuer has just rotated in is known by the time [`Auth::verify`] runs.
    pub async fn await_key(&self, token: Option<&str>) {
        let (Some(Jwt::Jwks(jwks)), Some(token)) = (&self.jwt, token) else {
            return;
        };
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return; // `verify` refuses it
        };
        if let Some(kid) = header.kid.as_deref() {
            jwks.refresh_for(kid).await;
        }
    }

    /// Whether a WebSocket needs a token.
    pub fn requires_token(&self) -> bool {
        self.jwt.is_some()
    }

    /// Whether `POST /publish` needs a credential.
    pub fn publish_requires_credential(&self) -> bool {
        self.jwt.is_some() || !self.api_keys.is_empty()
    }

    /// Verifies a JWT: signature, algorithm, `exp` (required), `nbf`, and `aud` and `iss`
    /// when `--jwt-audience` and `--jwt-issuer` are set. With `--jwt-jwks-url`, the key is
    /// the one of the token's `kid` in the set in force (the only key, for a token without a
    /// `kid`); this never fetches (see [`Auth::await_key`]).
    pub fn verify(&self, token: &str) -> Result<Grants, Denied> {
        let decoded = match &self.jwt {
            None => return Err(Denied::Invalid),
            Some(Jwt::Fixed(k)) => jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation),
            Some(Jwt::Jwks(jwks)) => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| Denied::Invalid)?;
                let keys = jwks.keys();
                let Some(k) = keys.find(header.kid.as_deref()) else {
                    tracing::debug!(kid = header.kid.as_deref(), "JWT key id not in the JWKS");
                    return Err(Denied::Invalid);
                };
                jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation)
            }
        };
        let data = decoded.map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => Denied::Expired,
                _ => Denied::Invalid,
            }
        })?;
        let patterns = |v: Vec<String>| v.iter().map(|p| TopicPattern::parse(p)).collect();
        Ok(Grants {
            subscribe: patterns(data.claims.subscribe),
            publish: patterns(data.claims.publish),
            exp: data.claims.exp.secs(),
        })
    }

    /// The access of a WebSocket request that carried `token` (if any).
    pub fn subscriber(&self, token: Option<&str>) -> Result<Access, Denied> {
        if self.jwt.is_none() {
            return Ok(Access::Open);
        }
        let token = token.ok_or(Denied::Missing)?;
        self.verify(token).map(Access::Granted)
    }

    /// Whether `token` may `POST /publish` to `topic`: an API key may publish anywhere, a JWT
    /// where it grants publish.
    pub fn publisher(&self, token: Option<&str>, topic: &Topic) -> Result<(), Denied> {
        if !self.publish_requires_credential() {
            return Ok(());
        }
        let token = token.ok_or(Denied::Missing)?;
        if self.is_api_key(token.as_bytes()) {
            return Ok(());
        }
        if self.jwt.is_none() {
            return Err(Denied::Invalid);
        }
        if self.verify(token)?.can_publish(topic) {
            Ok(())
        } else {
            Err(Denied::NotGranted)
        }
    }

    /// Compares the candidate's digest against every key's digest without stopping early, each
    /// comparison in constant time over 32 bytes, whatever the lengths of the keys.
    fn is_api_key(&self, candidate: &[u8]) -> bool {
        let candidate = key_digest(candidate);
        self.api_keys
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.ct_eq(&candidate)
            })
            .into()
    }

    /// Whether a request with this `Origin` header may open a WebSocket. Requests without one
    /// (non-browser clients) always may.
    pub fn origin_allowed(&self, origin: Option<&[u8]>) -> bool {
        if self.origins.is_empty() {
            return true;
        }
        let Some(origin) = origin else {
            return true;
        };
        let Ok(origin) = std::str::from_utf8(origin) else {
            return false;
        };
        let origin = origin.trim().to_ascii_lowercase();
        self.origins.iter().any(|p| p.matches(&origin))
    }
}

/// The checks every token gets whatever its key: leeway, `nbf`, and the audience and issuer
/// of the configuration.
fn validation(alg: Algorithm, audience: &[String], issuer: &[String]) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = JWT_LEEWAY_SECS;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    // RFC 7519 §4.1.3 asks a recipient that does not identify itself with an audience to
    // refuse tokens that have one; without --jwt-audience shardcast has no audience to be,
    // so it reads `aud` as none of its business, as most resource servers do.
    validation.validate_aud = !audience.is_empty();
    if !audience.is_empty() {
        validation.set_audience(audience);
        required.push("aud");
    }
    if !issuer.is_empty() {
        validation.set_issuer(issuer);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}

fn jwt_from(key: &JwtKey, config: &AuthConfig) -> Result<Jwt, Error> {
    let (audience, issuer) = (config.jwt_audience.clone(), config.jwt_issuer.clone());
    let (key, alg) = match key {
        JwtKey::Hs256(secret) => {
            if secret.expose().is_empty() {
                return Err(Error::Config("--jwt-secret must not be empty".into()));
            }
            (DecodingKey::from_secret(secret.expose()), Algorithm::HS256)
        }
        JwtKey::PublicKeyPem(pem) => {
            if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                (k, Algorithm::RS256)
            } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                (k, Algorithm::ES256)
            } else {
                return Err(Error::Config(
                    "--jwt-public-key: not an RSA or EC P-256 public key in PEM".into(),
                ));
            }
        }
        JwtKey::Jwks(url) => {
            let jwks = Jwks::new(
                url.clone(),
                config.jwks_refresh,
                config.jwks_cooldown,
                move |alg| validation(alg, &audience, &issuer),
            )
            .map_err(|e| Error::Config(format!("--jwt-jwks-url {url}: {e}")))?;
            return Ok(Jwt::Jwks(Arc::new(jwks)));
        }
    };
    let validation = validation(alg, &audience, &issuer);
    Ok(Jwt::Fixed(Box::new(Key { key, validation })))
}

/// An allowed origin: `scheme://host[:port]`, where the host may start with `*.` to allow
/// every subdomain (not the bare domain).
#[derive(Debug, Clone, PartialEq, Eq)]
struct OriginPattern {
    scheme: Box<str>,
    /// Lowercase host and port; for a wildcard, the part after `*` (starting with `.`).
    host: Box<str>,
    wildcard: bool,
}

impl OriginPattern {
    fn parse(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::Config(format!(
                "--allowed-origin {s:?}: expected scheme://host[:port] or scheme://*.domain"
            ))
        };
        let lower = s.trim().to_ascii_lowercase();
        let (scheme, host) = lower.split_once("://").ok_or_else(bad)?;
        if scheme.is_empty() || host.is_empty() || host.contains('/') {
            return Err(bad());
        }
        let (host, wildcard) = match host.strip_prefix('*') {
            Some(rest) if rest.starts_with('.') && rest.len() > 1 => (rest, true),
            Some(_) => return Err(bad()),
            None => (host, false),
        };
        if host.contains('*') {
            return Err(bad());
        }
        Ok(Self {
            scheme: scheme.into(),
            host: host.into(),
            wildcard,
        })
    }

    /// `origin` is already trimmed and lowercase.
    fn matches(&self, origin: &str) -> bool {
        let Some((scheme, host)) = origin.split_once("://") else {
            return false;
        };
        if scheme != &*self.scheme {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len() && host.ends_with(&*self.host)
        } else {
            host == &*self.host
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn topic(s: &str) -> Topic {
        Topic::new(s).expect("valid topic")
    }

    #[test]
    fn patterns_match_exact_names_and_prefixes() {
        assert!(TopicPattern::parse("chat").matches("chat"));
        assert!(!TopicPattern::parse("chat").matches("chat2"));
        assert!(TopicPattern::parse("prices.*").matches("prices.eur"));
        assert!(!TopicPattern::parse("prices.*").matches("prices"));
        assert!(TopicPattern::parse("*").matches("anything"));
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let auth = Auth::new(&AuthConfig {
            allowed_origins: vec![
                "https://app.example.com".into(),
                "https://*.example.org".into(),
            ],
            ..AuthConfig::default()
        })
        .expect("valid origins");
        assert!(auth.origin_allowed(None));
        assert!(auth.origin_allowed(Some(b"https://app.example.com")));
        assert!(auth.origin_allowed(Some(b"HTTPS://APP.example.com")));
        assert!(!auth.origin_allowed(Some(b"http://app.example.com")));
        assert!(!auth.origin_allowed(Some(b"https://evil.com")));
        assert!(auth.origin_allowed(Some(b"https://a.example.org")));
        assert!(!auth.origin_allowed(Some(b"https://example.org")));
        assert!(!auth.origin_allowed(Some(b"https://evilexample.org")));
        assert!(!auth.origin_allowed(Some(b"null")));
        for bad in [
            "example.com",
            "https://",
            "https://*",
            "https://a/b",
            "https://a*.b",
        ] {
            let c = AuthConfig {
                allowed_origins: vec![bad.into()],
                ..AuthConfig::default()
            };
            assert!(Auth::new(&c).is_err(), "{bad}");
        }
    }

    #[test]
    fn api_keys_of_different_lengths_match_only_exactly() {
        let auth = Auth::new(&AuthConfig {
            api_keys: vec![
                Secret::new(b"k".to_vec()),
                Secret::new(b"a-much-longer-key-of-forty-two-characters".to_vec()),
            ],
            ..AuthConfig::default()
        })
        .expect("valid auth");
        let t = topic("any");
        assert_eq!(auth.publisher(Some("k"), &t), Ok(()));
        let long = "a-much-longer-key-of-forty-two-characters";
        assert_eq!(auth.publisher(Some(long), &t), Ok(()));
        // Prefixes, extensions and a different length of the same bytes are all refused.
        for wrong in [
            "kk",
            "K",
            "a-much-longer-key",
            "a-much-longer-key-of-forty-two-characters!",
            "a-much-longer-key-of-forty-two-characterz",
        ] {
            assert_eq!(
                auth.publisher(Some(wrong), &t),
                Err(Denied::Invalid),
                "{wrong}"
            );
        }
        assert!(!auth.is_api_key(b""));
        assert!(!auth.is_api_key(&[b'k'; 1000]));
    }

    #[test]
    fn api_keys_and_tokens_gate_publish() {
        let secret = b"s3cret".to_vec();
        let auth = Auth::new(&AuthConfig {
            jwt: Some(JwtKey::Hs256(Secret::new(secret.clone()))),
            api_keys: vec![Secret::new(b"key-1".to_vec())],
            ..AuthConfig::default()
        })
        .expect("valid auth");
        let t = topic("prices.eur");
        assert_eq!(auth.publisher(None, &t), Err(Denied::Missing));
        assert_eq!(auth.publisher(Some("key-1"), &t), Ok(()));
        assert_eq!(auth.publisher(Some("key-2"), &t), Err(Denied::Invalid));
        let exp = jsonwebtoken::get_current_timestamp() + 600;
        let token = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(&secret),
            )
            .expect("encode token")
        };
        let good = token(serde_json::json!({"exp": exp, "publish": ["prices.*"]}));
        assert_eq!(auth.publisher(Some(&good), &t), Ok(()));
        assert_eq!(
            auth.publisher(Some(&good), &topic("chat")),
            Err(Denied::NotGranted)
        );
        let old = token(serde_json::json!({"exp": exp - 7200, "publish": ["*"]}));
        assert_eq!(auth.publisher(Some(&old), &t), Err(Denied::Expired));
        let no_exp = token(serde_json::json!({"publish": ["*"]}));
        assert_eq!(auth.publisher(Some(&no_exp), &t), Err(Denied::Invalid));
        // A fractional `exp` is read as jsonwebtoken's validation reads it: rounded.
        let frac = token(serde_json::json!({"exp": exp as f64 + 0.6, "subscribe": ["a"]}));
        let grants = auth
            .verify(&frac)
            .expect("a fractional exp is a NumericDate");
        assert_eq!(grants.exp, exp + 1);
        let until = grants.valid_until().expect("representable");
        let secs = until
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        assert_eq!(secs, exp + 1 + JWT_LEEWAY_SECS);
        let far = Grants {
            exp: u64::MAX,
            ..Grants::default()
        };
        assert_eq!(far.valid_until(), None);
        // Without --jwt-audience, `aud` is not checked.
        let aud = token(serde_json::json!({"exp": exp, "aud": "billing", "publish": ["*"]}));
        assert_eq!(auth.publisher(Some(&aud), &t), Ok(()));
    }
}
