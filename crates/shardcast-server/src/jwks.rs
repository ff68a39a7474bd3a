//! JWT keys from a JWKS endpoint (`--jwt-jwks-url`): the key set in force, its fetches
//! (plain HTTP or HTTPS over rustls with the system's roots), the refetch on an unknown `kid`
//! (at most one per `--jwt-jwks-cooldown`) and the periodic refresh (`--jwt-jwks-refresh`).
//! A failed fetch keeps the last good keys: it is logged and counted, never fatal, except
//! the first, at start (`Server::run_with`), which stops the server.
//!
//! Which claims a token must carry and what it grants live in `auth.rs`; this file only
//! knows keys.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper::header::{ACCEPT, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring};

/// A fetch (connect, TLS, request, body) that takes longer than this fails.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest JWKS document read; a key set is a few KiB.
const MAX_BODY: usize = 1 << 20;

/// A JWKS endpoint: an `http://` or `https://` URL with a host.
#[derive(Clone, PartialEq, Eq)]
pub struct JwksUrl(Uri);

impl FromStr for JwksUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let uri: Uri = s.trim().parse().map_err(|e| format!("{e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(format!("{s:?}: expected an http:// or https:// URL"));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("{s:?}: the URL has no host"));
        }
        Ok(Self(uri))
    }
}

impl fmt::Display for JwksUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for JwksUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwksUrl({})", self.0)
    }
}

impl JwksUrl {
    fn is_https(&self) -> bool {
        self.0.scheme_str() == Some("https")
    }
}

/// One usable key and the validation its algorithm needs.
pub(crate) struct Key {
    pub(crate) key: DecodingKey,
    pub(crate) validation: Validation,
}

/// The keys of one fetch.
#[derive(Default)]
pub(crate) struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    /// The key a token without a `kid` uses: only when the set has exactly one.
    only: Option<Arc<Key>>,
}

impl KeySet {
    pub(crate) fn find(&self, kid: Option<&str>) -> Option<&Arc<Key>> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => self.only.as_ref(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_kid.len().max(usize::from(self.only.is_some()))
    }

    /// Reads a JWKS document: the signing keys of the algorithms jsonwebtoken verifies.
    /// Symmetric keys, encryption keys and keys it cannot read are skipped; a set with no key
    /// left is an error.
    fn parse(body: &[u8], validation: impl Fn(Algorithm) -> Validation) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let doc: Document =
            serde_json::from_slice(body).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut set = Self::default();
        let mut usable = Vec::new();
        for value in doc.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            let Some(alg) = signing_algorithm(&jwk) else {
                continue;
            };
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            let key = Arc::new(Key {
                key,
                validation: validation(alg),
            });
            if let Some(kid) = &jwk.common.key_id {
                set.by_kid.insert(kid.clone(), Arc::clone(&key));
            }
            usable.push(key);
        }
        if usable.is_empty() {
            return Err("the JWK set has no usable signing key".into());
        }
        if usable.len() == 1 {
            set.only = usable.pop();
        }
        Ok(set)
    }
}

/// The algorithm a JWK verifies: its `alg` if it names an asymmetric one, else the usual one
/// for its key type (RSA: RS256, P-256: ES256, P-384: ES384, Ed25519: EdDSA). `None` for
/// encryption keys, symmetric keys and unknown types.
fn signing_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
        (Some(named), _) => Algorithm::from_str(&named.to_string()).ok()?,
        (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
        (None, AlgorithmParameters::EllipticCurve(p)) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        (None, AlgorithmParameters::OctetKeyPair(p)) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    // A shared secret published in a key set would let anyone who can read it sign.
    (!matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)).then_some(alg)
}

/// JWKS fetch counters, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JwksStats {
    /// Fetches that replaced the key set.
    pub fetched: u64,
    /// Fetches that failed (the last good keys stayed in force).
    pub failed: u64,
    /// Keys in force.
    pub keys: usize,
}

/// The key set in force and what refreshes it.
pub(crate) struct Jwks {
    url: JwksUrl,
    refresh: Duration,
    cooldown: Duration,
    tls: Option<TlsConnector>,
    /// Builds the validation of a key's algorithm (leeway, `nbf`, audience, issuer).
    validation: Box<dyn Fn(Algorithm) -> Validation + Send + Sync>,
    keys: RwLock<Arc<KeySet>>,
    /// When the last fetch of any kind began.
    last_fetch: Mutex<Option<Instant>>,
    /// Held for the length of a fetch: one at a time, and a request that waited for it sees
    /// its keys.
    fetching: tokio::sync::Mutex<()>,
    fetched: AtomicU64,
    failed: AtomicU64,
}

impl Jwks {
    /// No fetch yet: that is [`Jwks::start`]'s. An `https://` URL loads the system's root
    /// certificates here.
    pub(crate) fn new(
        url: JwksUrl,
        refresh: Duration,
        cooldown: Duration,
        validation: impl Fn(Algorithm) -> Validation + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let tls = url.is_https().then(tls_connector).transpose()?;
        Ok(Self {
            url,
            refresh,
            cooldown,
            tls,
            validation: Box::new(validation),
            keys: RwLock::default(),
            last_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            fetched: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    pub(crate) fn url(&self) -> &JwksUrl {
        &self.url
    }

    /// The keys in force.
    pub(crate) fn keys(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn stats(&self) -> JwksStats {
        JwksStats {
            fetched: self.fetched.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            keys: self.keys().len(),
        }
    }

    /// The first fetch, which must succeed, then the periodic refresh in a task that ends
    /// once the last handle on `self` is gone.
    pub(crate) async fn start(self: &Arc<Self>) -> Result<(), String> {
        {
            let _turn = self.fetching.lock().await;
            self.fetch("start").await?;
        }
        let weak = Arc::downgrade(self);
        let every = self.refresh;
        tokio::spawn(refresh_periodically(weak, every));
        Ok(())
    }

    /// A token names `kid`, which the set in force lacks: refetch, unless a fetch began less
    /// than the cooldown ago. Returns once the keys are as fresh as they will get.
    pub(crate) async fn refresh_for(&self, kid: &str) {
        let known = |j: &Self| j.keys().by_kid.contains_key(kid);
        if known(self) {
            return;
        }
        let _turn = self.fetching.lock().await;
        if known(self) {
            return; // the fetch this request waited for brought it
        }
        let last = *self
            .last_fetch
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < self.cooldown) {
            tracing::debug!(
                kid,
                "unknown JWT key id; the JWKS was fetched too recently to refetch"
            );
            return;
        }
        let _ = self.fetch("unknown key id").await;
    }

    /// Fetches the set and puts it in force; on failure keeps the last one. The caller holds
    /// `fetching`.
    async fn fetch(&self, why: &str) -> Result<(), String> {
        *self
            .last_fetch
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let got = match tokio::time::timeout(FETCH_TIMEOUT, get(&self.url, self.tls.as_ref())).await
        {
            Ok(body) => body.and_then(|b| KeySet::parse(&b, &self.validation)),
            Err(_) => Err(format!("no answer within {FETCH_TIMEOUT:?}")),
        };
        match got {
            Ok(set) => {
                let n = set.len();
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
                self.fetched.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(url = %self.url, keys = n, why, "JWKS fetched");
                Ok(())
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(url = %self.url, error = %e, why, "JWKS fetch failed; the last good keys stay in force");
                Err(e)
            }
        }
    }
}

async fn refresh_periodically(jwks: Weak<Jwks>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(jwks) = jwks.upgrade() else {
            return;
        };
        let _turn = jwks.fetching.lock().await;
        let _ = jwks.fetch("periodic refresh").await;
    }
}

/// TLS 1.2 and 1.3 with the ring provider and the system's root certificates.
fn tls_connector() -> Result<TlsConnector, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(format!(
            "no usable root certificate in the system's store (install ca-certificates){}",
            found
                .errors
                .first()
                .map_or(String::new(), |e| format!(": {e}"))
        ));
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `GET url` on a connection of its own; the body of a 200 answer.
async fn get(url: &JwksUrl, tls: Option<&TlsConnector>) -> Result<Bytes, String> {
    let uri = &url.0;
    // The parser checked that there is a host; IPv6 literals come bracketed.
    let host = uri.host().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if tls.is_some() { 443 } else { 80 });
    let tcp = TcpStream::connect((bare, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match tls {
        None => request(tcp, uri).await,
        Some(tls) => {
            let name = ServerName::try_from(bare.to_string()).map_err(|e| e.to_string())?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            request(stream, uri).await
        }
    }
}

async fn request(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    uri: &Uri,
) -> Result<Bytes, String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = uri.authority().map_or("", |a| a.as_str());
    let req = hyper::Request::get(path)
        .header(HOST, authority)
        .header(ACCEPT, "application/json")
        .header(USER_AGENT, concat!("shardcast/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let result = async {
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        if res.status() != hyper::StatusCode::OK {
            return Err(format!("HTTP status {}", res.status()));
        }
        let body = Limited::new(res.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok(body.to_bytes())
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validation(alg: Algorithm) -> Validation {
        Validation::new(alg)
    }

    #[test]
    fn urls_need_http_or_https_and_a_host() {
        assert!("http://127.0.0.1:8080/jwks.json".parse::<JwksUrl>().is_ok());
        assert!(
            "https://idp.example.com/.well-known/jwks.json"
                .parse::<JwksUrl>()
                .is_ok()
        );
        for bad in ["ftp://x/jwks", "/jwks.json", "idp.example.com", "http:///x"] {
            assert!(bad.parse::<JwksUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_set_keeps_signing_keys_and_skips_the_rest() {
        let doc = serde_json::json!({"keys": [
            // P-256, no alg: ES256.
            {"kty": "EC", "crv": "P-256", "kid": "ec",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            // An encryption key and a shared secret: skipped.
            {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
            // Unreadable: skipped.
            {"kty": "RSA", "kid": "broken"},
        ]});
        let set = KeySet::parse(doc.to_string().as_bytes(), validation).expect("one usable key");
        assert_eq!(set.len(), 1);
        let ec = set.find(Some("ec")).expect("the EC key");
        assert_eq!(ec.validation.algorithms, [Algorithm::ES256]);
        assert!(
            set.find(None).is_some(),
            "the only key serves tokens without a kid"
        );
        for kid in ["enc", "secret", "broken", "other"] {
            assert!(set.find(Some(kid)).is_none(), "{kid}");
        }
        let none = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
        assert!(KeySet::parse(none.to_string().as_bytes(), validation).is_err());
        assert!(KeySet::parse(b"<html>", validation).is_err());
    }
}
