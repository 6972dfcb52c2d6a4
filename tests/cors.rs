//! Browser origins against the real binary: preflights, `Access-Control-Allow-*`
//! headers, the one origin rule of every listener endpoint (a foreign page is refused
//! with 403 and changes nothing), the `*` wildcard, and `cors_origins` from the config
//! file and the environment.
//!
//! `/listen` is reached both ways the server serves it: as a connection's first
//! request (served directly on the socket) and as a later request of a kept-alive
//! connection (through the HTTP framework). Raw sockets make the difference certain.

mod common;

use common::{Server, WAIT, uid, within};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ALLOWED: &str = "http://app.test";
const FOREIGN: &str = "http://evil.test";

/// One HTTP/1.1 answer read off a raw socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// `(name, value)`, names in lowercase.
    headers: Vec<(String, String)>,
    /// The body as JSON, when it has a `content-length` (a stream's is not read).
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `access-control-allow-*` headers.
    fn cors(&self) -> Vec<&(String, String)> {
        self.headers
            .iter()
            .filter(|(n, _)| n.starts_with("access-control-allow-"))
            .collect()
    }
}

/// Writes `request` and reads one answer: the head, and a body as long as its
/// `content-length` (none for a stream, which is left unread).
async fn exchange(stream: &mut TcpStream, request: &str) -> Answer {
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    within("an answer", WAIT, async {
        loop {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).to_string();
                let mut lines = head.split("\r\n");
                let status = lines
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("a status line: {head:?}"));
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                let length = headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .map(|(_, v)| v.parse::<usize>().expect("a numeric content-length"));
                let Some(length) = length else {
                    return Answer {
                        status,
                        headers,
                        body: Value::Null,
                    };
                };
                if data.len() >= end + 4 + length {
                    let body = serde_json::from_slice(&data[end + 4..end + 4 + length])
                        .unwrap_or(Value::Null);
                    return Answer {
                        status,
                        headers,
                        body,
                    };
                }
            }
            let n = stream.read(&mut buf).await.expect("read answer");
            assert!(
                n > 0,
                "the connection closed inside an answer: {:?}",
                String::from_utf8_lossy(&data)
            );
            data.extend_from_slice(&buf[..n]);
        }
    })
    .await
}

/// `GET {path}` with `origin` (if any) as a request head.
fn get(server: &Server, path: &str, origin: Option<&str>) -> String {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\n{origin}\r\n",
        server.addr()
    )
}

/// `GET {path}` as the first request of a new connection: `/listen` is served directly
/// on the socket.
async fn first_request(server: &Server, path: &str, origin: Option<&str>) -> Answer {
    let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
    exchange(&mut stream, &get(server, path, origin)).await
}

/// `GET {path}` as the second request of a kept-alive connection: through the HTTP
/// framework, whatever the path.
async fn second_request(server: &Server, path: &str, origin: Option<&str>) -> Answer {
    let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
    let first = exchange(&mut stream, &get(server, "/healthz", None)).await;
    assert_eq!(first.status, 200, "{first:?}");
    exchange(&mut stream, &get(server, path, origin)).await
}

/// Checks a stream that opened for a page at `origin`: 200, and the header that lets
/// the page read it. `framework` says which path should have served it (the direct path
/// closes the connection after the stream; the framework keeps it).
#[track_caller]
fn assert_open_for(answer: &Answer, origin: &str, framework: bool) {
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.header("content-type"),
        Some("text/event-stream"),
        "{answer:?}"
    );
    // One answer on both paths: the origin echoed (also for `*`, so a page that sends
    // credentials is served too), and `Vary` so caches keep one answer per origin.
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some(origin),
        "access-control-allow-origin for {origin}: {answer:?}"
    );
    assert_eq!(answer.header("vary"), Some("origin"), "{answer:?}");
    let closes = answer.header("connection") == Some("close");
    assert_eq!(
        closes,
        !framework,
        "served by the {} path: {answer:?}",
        if framework { "framework" } else { "direct" }
    );
}

/// Checks a refusal of a foreign page: 403 `origin_not_allowed`, nothing a browser
/// would let the page read.
#[track_caller]
fn assert_refused(answer: &Answer) {
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(
        answer.body["error"]["code"], "origin_not_allowed",
        "{answer:?}"
    );
    assert!(answer.cors().is_empty(), "no CORS headers: {answer:?}");
}

/// `OPTIONS {path}` as a browser sends it before a cross-origin `GET` with
/// `Last-Event-ID`.
async fn preflight(server: &Server, path: &str, origin: &str) -> reqwest::Response {
    server
        .client()
        .request(Method::OPTIONS, format!("{}{path}", server.url()))
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "last-event-id")
        .send()
        .await
        .expect("preflight")
}

fn cors_headers(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-allow-"))
        .collect()
}

/// Checks that a preflight from `origin` to every endpoint a page uses is answered
/// with what lets the `GET` follow.
async fn assert_preflights_allow(server: &Server, uid: &str, origin: &str) {
    for path in [
        format!("/listen/{uid}"),
        format!("/ws/{uid}"),
        format!("/poll/{uid}"),
        "/dolores.js".to_owned(),
    ] {
        let response = preflight(server, &path, origin).await;
        assert!(response.status().is_success(), "{path}: {response:?}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_ascii_lowercase()
        };
        let allowed = header("access-control-allow-origin");
        assert_eq!(allowed, origin, "{path}: access-control-allow-origin");
        assert!(header("vary").contains("origin"), "{path}: {response:?}");
        assert!(
            header("access-control-allow-methods").contains("get"),
            "{path}: {response:?}"
        );
        assert!(
            header("access-control-allow-headers").contains("last-event-id"),
            "{path}: {response:?}"
        );
    }
}

/// A poll as a page at `origin` sends it.
async fn poll_from(server: &Server, uid: &str, query: &str, origin: &str) -> reqwest::Response {
    server
        .client()
        .get(format!("{}/poll/{uid}{query}", server.url()))
        .header("origin", origin)
        .send()
        .await
        .expect("poll")
}

fn event_ids(body: &Value) -> Vec<u64> {
    body["events"]
        .as_array()
        .unwrap_or_else(|| panic!("events: {body}"))
        .iter()
        .map(|e| common::id_of(&e["id"]))
        .collect()
}

#[tokio::test]
async fn preflights_from_an_allowed_origin_get_the_cors_headers_and_foreign_ones_none() {
    let server = Server::start_args(&["--cors-origins", ALLOWED]).await;
    let uid = uid("preflight");
    assert_preflights_allow(&server, &uid, ALLOWED).await;
    for path in [
        format!("/listen/{uid}"),
        format!("/ws/{uid}"),
        format!("/poll/{uid}"),
        "/dolores.js".to_owned(),
    ] {
        let response = preflight(&server, &path, FOREIGN).await;
        assert_eq!(
            cors_headers(&response),
            Vec::<String>::new(),
            "{path}: {response:?}"
        );
    }
}

#[tokio::test]
async fn a_foreign_page_is_refused_on_listen_and_poll_and_moves_nothing() {
    let server = Server::start_args(&["--cors-origins", ALLOWED]).await;
    let uid = uid("foreign");
    server.connect(&uid, ":data").await;
    let first = server.publish(":data", json!("first")).await;
    let listen = format!("/listen/{uid}");

    // /listen, both paths.
    assert_refused(&first_request(&server, &listen, Some(FOREIGN)).await);
    assert_refused(&second_request(&server, &listen, Some(FOREIGN)).await);

    // /poll: refused, with a cursor that would acknowledge `first`.
    let response = poll_from(
        &server,
        &uid,
        &format!("?timeout=0&last_event_id={first}"),
        FOREIGN,
    )
    .await;
    let headers = cors_headers(&response);
    let answer = common::read_json(response).await;
    common::assert_error(&answer, 403, "origin_not_allowed");
    assert_eq!(headers, Vec::<String>::new(), "no CORS headers");
    // The cursor did not move: a poll without one still gets `first` (acks are merged
    // into reads at once, so a moved cursor would show here).
    let (status, body) = server.get(&format!("/poll/{uid}?timeout=0")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(event_ids(&body), vec![first], "{body}");
    let (_, listener) = server.listener(&uid).await;
    assert_eq!(listener["online"], 0, "no stream opened: {listener}");

    // The same requests from the allowed page, the server's own origin, and no browser.
    // The streams are another listener's: one that opens delivers `first` and moves
    // this listener's cursor.
    let other_uid = common::uid("foreign-other");
    server.connect(&other_uid, ":data").await;
    let other = format!("/listen/{other_uid}");
    let own = server.url();
    for origin in [ALLOWED, own.as_str()] {
        let direct = first_request(&server, &other, Some(origin)).await;
        let framework = second_request(&server, &other, Some(origin)).await;
        if origin == ALLOWED {
            assert_open_for(&direct, origin, false);
            assert_open_for(&framework, origin, true);
        } else {
            assert_eq!(direct.status, 200, "same origin: {direct:?}");
            assert_eq!(framework.status, 200, "same origin: {framework:?}");
        }
        let response = poll_from(&server, &uid, "?timeout=0", origin).await;
        let allowed = response
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap_or("?").to_owned());
        let (status, body) = common::read_json(response).await;
        assert_eq!(status, 200, "{origin}: {body}");
        assert_eq!(event_ids(&body), vec![first], "{body}");
        if origin == ALLOWED {
            assert_eq!(allowed.as_deref(), Some(ALLOWED));
        }
    }
    assert_eq!(first_request(&server, &other, None).await.status, 200);
    assert_eq!(second_request(&server, &other, None).await.status, 200);
}

#[tokio::test]
async fn the_wildcard_allows_every_origin_on_every_endpoint() {
    let server = Server::start_args(&["--cors-origins", "*"]).await;
    let uid = uid("wildcard");
    server.connect(&uid, ":data").await;
    let id = server.publish(":data", json!("hi")).await;
    let anywhere = "https://anywhere.example:8443";
    assert_preflights_allow(&server, &uid, anywhere).await;
    let listen = format!("/listen/{uid}");
    assert_open_for(
        &first_request(&server, &listen, Some(anywhere)).await,
        anywhere,
        false,
    );
    assert_open_for(
        &second_request(&server, &listen, Some(anywhere)).await,
        anywhere,
        true,
    );
    // With a cursor: the streams above delivered `id` and moved the listener's.
    let response = poll_from(&server, &uid, "?timeout=0&last_event_id=0", anywhere).await;
    let allowed = response
        .headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    let (status, body) = common::read_json(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(event_ids(&body), vec![id]);
    assert_eq!(allowed.as_deref(), Some(anywhere));
    // And the WebSocket.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/ws/{uid}",
            server.addr()
        ))
        .expect("request");
    request
        .headers_mut()
        .insert("origin", anywhere.parse().expect("header"));
    let _socket = within(
        "a websocket from any origin",
        WAIT,
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("upgraded");
}

/// Checks that `allowed` is allowed and [`FOREIGN`] is not, on a preflight and on a
/// stream.
async fn assert_origins(server: &Server, allowed: &[&str]) {
    let uid = uid("cors-setting");
    server.connect(&uid, ":data").await;
    let listen = format!("/listen/{uid}");
    for origin in allowed {
        assert_preflights_allow(server, &uid, origin).await;
        assert_open_for(
            &first_request(server, &listen, Some(origin)).await,
            origin,
            false,
        );
    }
    assert_eq!(
        cors_headers(&preflight(server, &listen, FOREIGN).await),
        Vec::<String>::new()
    );
    assert_refused(&first_request(server, &listen, Some(FOREIGN)).await);
}

#[tokio::test]
async fn cors_origins_come_from_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dolores.toml");
    std::fs::write(
        &path,
        "cors_origins = [\"http://file.test\", \"https://other.file.test/\"]\n",
    )
    .expect("write config");
    let server = Server::config()
        .memory()
        .args(["--config", path.to_str().expect("utf-8 path")])
        .start()
        .await;
    assert_origins(&server, &["http://file.test", "https://other.file.test"]).await;
}

#[tokio::test]
async fn cors_origins_come_from_the_environment() {
    let server = Server::config()
        .memory()
        .env(
            "DOLORES_CORS_ORIGINS",
            "http://env.test,http://second.env.test",
        )
        .spawn()
        .await;
    assert_origins(&server, &["http://env.test", "http://second.env.test"]).await;
}

/// `GET {path}` naming `host` in `Host` and `origin` in `Origin`, as a page at a name
/// that resolves to this server sends it.
fn get_as(path: &str, host: &str, origin: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n\r\n")
}

/// A WebSocket upgrade naming `host` and `origin`.
fn upgrade_as(path: &str, host: &str, origin: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// DNS rebinding: a page at `http://evil.test:PORT`, whose name was made to resolve to
/// this server, sends a `Host` that matches its `Origin`. That is not this server's
/// origin, on any endpoint, either path; its own address and `localhost` are.
#[tokio::test]
async fn a_host_that_matches_the_origin_is_not_same_origin() {
    let server = Server::start().await;
    let uid = uid("rebinding");
    server.connect(&uid, ":data").await;
    let port = server.addr().rsplit(':').next().expect("port").to_owned();
    let rebound = format!("evil.test:{port}");
    let rebound_origin = format!("http://{rebound}");
    for path in [format!("/listen/{uid}"), format!("/poll/{uid}?timeout=0")] {
        let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
        let direct = exchange(&mut stream, &get_as(&path, &rebound, &rebound_origin)).await;
        assert_refused(&direct);
        let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
        let first = exchange(&mut stream, &get_as("/healthz", &rebound, &rebound_origin)).await;
        assert_eq!(first.status, 200, "{first:?}");
        let framework = exchange(&mut stream, &get_as(&path, &rebound, &rebound_origin)).await;
        assert_refused(&framework);
    }
    let ws = format!("/ws/{uid}");
    let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
    assert_refused(&exchange(&mut stream, &upgrade_as(&ws, &rebound, &rebound_origin)).await);
    // The server's own origins, as a browser at its address or at localhost sends them.
    for own in [
        format!("http://{}", server.addr()),
        format!("http://localhost:{port}"),
    ] {
        let host = own.trim_start_matches("http://");
        let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
        let answer = exchange(
            &mut stream,
            &get_as(&format!("/poll/{uid}?timeout=0"), host, &own),
        )
        .await;
        assert_eq!(answer.status, 200, "{own}: {answer:?}");
        assert!(
            answer.cors().is_empty(),
            "same origin needs no CORS: {answer:?}"
        );
        let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
        let answer = exchange(&mut stream, &upgrade_as(&ws, host, &own)).await;
        assert_eq!(answer.status, 101, "{own}: {answer:?}");
    }
}

/// With `public_origins`, those are the server's own origins (behind a proxy, the
/// app's), and the listen address no longer is; a `*` there is refused at start.
#[tokio::test]
async fn public_origins_name_the_servers_own_pages() {
    let server = Server::start_args(&["--public-origins", "https://app.test"]).await;
    let uid = uid("public");
    server.connect(&uid, ":data").await;
    let poll = format!("/poll/{uid}?timeout=0");
    let answer = first_request(&server, &poll, Some("https://app.test")).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer.cors().is_empty(),
        "same origin needs no CORS: {answer:?}"
    );
    assert_refused(&first_request(&server, &poll, Some("http://app.test")).await);
    let own = format!("http://{}", server.addr());
    assert_refused(&first_request(&server, &poll, Some(&own)).await);

    let refused = common::command()
        .args([
            "serve",
            "--memory",
            "--listen",
            "127.0.0.1:0",
            "--public-origins",
            "*",
        ])
        .output()
        .await
        .expect("run dolores");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("public_origins \"*\""), "{stderr}");
}
