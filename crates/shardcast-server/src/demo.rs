//! The browser demo served at `/`: a chat room and a live fan-out view over `/ws/{topic}`
//! (`assets/demo/`, embedded in the binary). Whether it is served is decided once at start
//! (`--demo`, see [`crate::Demo`] and [`enabled`]); routing lives in `handshake.rs`, the response in `http.rs`.

/// The demo's files by request path: content type and body.
pub(crate) fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    Some(match path {
        "/" | "/index.html" => (
            "text/html; charset=utf-8",
            include_str!("../assets/demo/index.html"),
        ),
        "/demo.css" => (
            "text/css; charset=utf-8",
            include_str!("../assets/demo/demo.css"),
        ),
        "/demo.js" => (
            "text/javascript; charset=utf-8",
            include_str!("../assets/demo/demo.js"),
        ),
        _ => return None,
    })
}

/// Whether to serve the demo on a listener bound to `local`. `--demo auto` (the default)
/// serves it only on loopback (a newcomer's `cargo run` shows it; a public node does not
/// advertise an open chat room) and only without a JWT key (the page has no token, so it
/// could not connect).
pub(crate) fn enabled(config: &crate::Config, local: std::net::SocketAddr) -> bool {
    match config.demo {
        crate::Demo::True => true,
        crate::Demo::False => false,
        crate::Demo::Auto => local.ip().is_loopback() && config.auth.jwt.is_none(),
    }
}

/// The page's policy: its own files, WebSocket connections to any host (the page may be told
/// another relay on loopback with `?server=`), nothing else; no inline script or style.
pub(crate) const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_the_files_it_names_are_served() {
        let (ty, page) = asset("/").expect("the page");
        assert!(ty.starts_with("text/html"));
        for name in ["demo.css", "demo.js"] {
            assert!(page.contains(name), "the page names {name}");
            assert!(asset(&format!("/{name}")).is_some(), "{name} is served");
        }
        assert!(asset("/other.js").is_none());
        // No external requests: nothing in the files names another origin.
        for path in ["/", "/demo.css", "/demo.js"] {
            let (_, body) = asset(path).expect("listed above");
            assert!(
                !body.contains("https://"),
                "{path} names an external origin"
            );
        }
    }
}
