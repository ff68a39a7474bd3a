//! The browser demo at `/`: served on a loopback listener without a JWT key, with its files
//! and headers; not served off loopback or with a JWT key (404); `--demo true|false` decides
//! otherwise. The page's behaviour in a real browser is `tests/browser/demo.test.mjs`.

use std::net::SocketAddr;
use std::time::Duration;

use shardcast_server::{AuthConfig, Config, Demo, JwtKey, Secret, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves `config` on `bind` until the test ends; returns the address to dial.
async fn serve(bind: SocketAddr, config: Config) -> SocketAddr {
    let listener = TcpListener::bind(bind).await.expect("bind a test port");
    let port = listener.local_addr().expect("a bound address").port();
    let server = Server::new(listener, config).expect("a valid configuration");
    tokio::spawn(server.run(std::future::pending::<()>()));
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One request on a fresh connection; the whole response (the server closes it).
async fn get(addr: SocketAddr, method: &str, path: &str) -> String {
    let io = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send the request");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read the response");
        String::from_utf8(out).expect("a text response")
    };
    tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .expect("the server answers within 10 s")
}

#[tokio::test]
async fn loopback_serves_the_page_and_its_files() {
    let addr = serve("127.0.0.1:0".parse().expect("addr"), Config::default()).await;
    let page = get(addr, "GET", "/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("content-type: text/html; charset=utf-8"),
        "{page}"
    );
    assert!(
        page.contains("content-security-policy: default-src 'self'"),
        "{page}"
    );
    assert!(page.contains("x-content-type-options: nosniff"), "{page}");
    assert!(page.contains("<script src=\"demo.js\">"), "{page}");
    let js = get(addr, "GET", "/demo.js").await;
    assert!(
        js.starts_with("HTTP/1.1 200") && js.contains("text/javascript"),
        "{js}"
    );
    let css = get(addr, "GET", "/demo.css").await;
    assert!(
        css.starts_with("HTTP/1.1 200") && css.contains("text/css"),
        "{css}"
    );
    let head = get(addr, "HEAD", "/").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.contains("<script"), "HEAD has no body: {head}");
    let post = get(addr, "POST", "/").await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let other = get(addr, "GET", "/nothing.js").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}

#[tokio::test]
async fn a_public_listener_or_a_jwt_key_hides_the_page() {
    // Every interface: not loopback, so no page (it is still reachable on 127.0.0.1).
    let public = serve("0.0.0.0:0".parse().expect("addr"), Config::default()).await;
    let res = get(public, "GET", "/").await;
    assert!(res.starts_with("HTTP/1.1 404"), "{res}");
    let jwt = Config {
        auth: AuthConfig {
            jwt: Some(JwtKey::Hs256(Secret::new(&b"test secret"[..]))),
            ..AuthConfig::default()
        },
        ..Config::default()
    };
    let with_jwt = serve("127.0.0.1:0".parse().expect("addr"), jwt).await;
    let res = get(with_jwt, "GET", "/").await;
    assert!(res.starts_with("HTTP/1.1 404"), "{res}");
}

#[tokio::test]
async fn the_demo_setting_overrides_auto() {
    let on = Config {
        demo: Demo::True,
        ..Config::default()
    };
    let public = serve("0.0.0.0:0".parse().expect("addr"), on).await;
    let res = get(public, "GET", "/").await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    let off = Config {
        demo: Demo::False,
        ..Config::default()
    };
    let local = serve("127.0.0.1:0".parse().expect("addr"), off).await;
    let res = get(local, "GET", "/").await;
    assert!(res.starts_with("HTTP/1.1 404"), "{res}");
}
