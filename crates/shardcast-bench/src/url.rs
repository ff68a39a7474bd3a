//! URL templates and the small URL parser the load generator needs: scheme, host, port and
//! request target. No percent-decoding and no userinfo; connecting lives in `client.rs`.

use std::net::SocketAddr;

use super::Error;

/// The schemes the tools speak. `wss://` and `https://` are not supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Ws,
    Http,
}

/// A parsed URL: where to connect and what to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    /// The host as written (brackets kept for IPv6), for the `Host` header.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, Error> {
        let bad = |why: &str| Error::BadArgs(format!("bad URL {s:?}: {why}"));
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (scheme, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "ws" => (Scheme::Ws, 80),
            "http" => (Scheme::Http, 80),
            "wss" | "https" => return Err(bad("TLS (wss://, https://) is not supported")),
            _ => return Err(bad("the scheme must be ws:// or http://")),
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(split);
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        if authority.contains('@') {
            return Err(bad("userinfo is not supported"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => {
                let port = p.parse::<u16>().map_err(|_| bad("bad port"))?;
                (h, port)
            }
            _ => (authority, default_port),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let target = match target {
            "" => "/".to_string(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_string(),
        };
        if target.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(bad("spaces or control characters in the path"));
        }
        Ok(Url {
            scheme,
            host: host.to_string(),
            port,
            target,
        })
    }

    /// The `Host` header value.
    pub fn host_header(&self) -> String {
        if self.port == 80 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolves the host to its first address.
    pub async fn resolve(&self) -> Result<SocketAddr, Error> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let mut addrs = tokio::net::lookup_host((host, self.port))
            .await
            .map_err(|e| Error::io(format!("resolving {}", self.host), e))?;
        addrs
            .next()
            .ok_or_else(|| Error::BadArgs(format!("{} resolves to no address", self.host)))
    }
}

/// A URL with `{topic}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
}

impl Template {
    /// Checks that the template parses once expanded.
    pub fn new(text: &str) -> Result<Template, Error> {
        let t = Template {
            text: text.to_string(),
        };
        Url::parse(&t.expand("t"))?;
        Ok(t)
    }

    pub fn expand(&self, topic: &str) -> String {
        self.text.replace("{topic}", topic)
    }

    pub fn url(&self, topic: &str) -> Result<Url, Error> {
        Url::parse(&self.expand(topic))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Parses `Name: value` header flags.
pub fn parse_headers(raw: &[String]) -> Result<Vec<(String, String)>, Error> {
    raw.iter()
        .map(|h| {
            let (name, value) = h.split_once(':').ok_or_else(|| {
                Error::BadArgs(format!("bad header {h:?}: expected 'Name: value'"))
            })?;
            let name = name.trim();
            let value = value.trim();
            let bad_name = name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if bad_name || value.bytes().any(|b| b == b'\r' || b == b'\n') {
                return Err(Error::BadArgs(format!("bad header {h:?}")));
            }
            Ok((name.to_string(), value.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_the_templates_use() {
        let u = Url::parse("ws://127.0.0.1:9001/?topic=a").unwrap();
        assert_eq!(
            (u.scheme, u.port, u.target.as_str()),
            (Scheme::Ws, 9001, "/?topic=a")
        );
        let u = Url::parse("http://localhost/publish/x").unwrap();
        assert_eq!(
            (u.scheme, u.port, u.host_header().as_str()),
            (Scheme::Http, 80, "localhost")
        );
        let u = Url::parse("ws://[::1]:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("[::1]", 8080, "/")
        );
        let u = Url::parse("ws://h?topic=a").unwrap();
        assert_eq!(u.target, "/?topic=a");
        for bad in [
            "127.0.0.1:80",
            "ftp://x/",
            "ws://",
            "ws://h:port/",
            "wss://h/",
            "ws://h/a b",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_expand_every_placeholder() {
        let t = Template::new("ws://h:1/ws/{topic}?again={topic}").unwrap();
        assert_eq!(t.expand("x"), "ws://h:1/ws/x?again=x");
    }

    #[test]
    fn headers_need_a_name_and_no_line_breaks() {
        let h = parse_headers(&["Authorization: Bearer abc".into()]).unwrap();
        assert_eq!(h, vec![("Authorization".into(), "Bearer abc".into())]);
        assert!(parse_headers(&["nocolon".into()]).is_err());
        assert!(parse_headers(&["Bad Name: x".into()]).is_err());
        assert!(parse_headers(&["X: a\r\nInjected: b".into()]).is_err());
    }
}
