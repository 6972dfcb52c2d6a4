//! Dolores behind real nginx and real Caddy, each run with the very files in `deploy/`
//! (ports filled in): every endpoint through the proxy — Server-Sent Events unbuffered,
//! WebSocket, long-poll, the backend API, `/dolores.js`, the status page — with and
//! without `--base-path`; and `X-Forwarded-*` believed only from a trusted proxy.
//!
//! Each proxy is our own process on a free loopback port with its own temp dir for
//! config, pid, logs and state, never the system service. Needs `nginx` (Debian
//! `nginx-light`) and `caddy` on the PATH; `scripts/test` installs them.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Server, Sse, WAIT, eventually, uid, within};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What the trusted-proxies setting is in every test: loopback's usual addresses only,
/// so a client on 127.0.0.2 is not a proxy.
const TRUSTED: &str = "127.0.0.1/32,::1/128";
/// A loopback address outside [`TRUSTED`]: "a browser" that connects from there.
const OUTSIDER: &str = "127.0.0.2";

/// Which proxy.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Nginx,
    Caddy,
}

/// A proxy process of our own, stopped when dropped.
struct Proxy {
    _child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Proxy {
    /// Starts `kind` on `port` with `deploy/{file}`, Dolores at `dolores` (`host:port`)
    /// and the app at `app`.
    async fn start(kind: Kind, port: u16, file: &str, dolores: &str, app: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = std::fs::read_to_string(deploy_file(file)).expect("read the deploy file");
        let text = substitute(&text, "127.0.0.1:8007", dolores);
        let text = if text.contains("127.0.0.1:8000") {
            substitute(&text, "127.0.0.1:8000", app)
        } else {
            text
        };
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let mut command = match kind {
            Kind::Nginx => {
                let site = substitute(&text, "listen 80;", &format!("listen 127.0.0.1:{port};"));
                std::fs::write(dir.path().join("site.conf"), site).expect("write site");
                let d = dir.path().display();
                let main = format!(
                    "pid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
                     # One process, no workers: nothing outlives the SIGKILL of a drop.\n\
                     master_process off;\n\
                     events {{ worker_connections 512; }}\n\
                     http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
                     proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
                     uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/site.conf;\n}}\n"
                );
                std::fs::write(dir.path().join("nginx.conf"), main).expect("write nginx.conf");
                let mut command = Command::new(program("nginx"));
                command
                    .arg("-p")
                    .arg(dir.path())
                    .arg("-e")
                    .arg(dir.path().join("error.log"))
                    .arg("-c")
                    .arg(dir.path().join("nginx.conf"))
                    .args(["-g", "daemon off;"]);
                command
            }
            Kind::Caddy => {
                let host = ["app.example.com {", "push.example.com {"]
                    .into_iter()
                    .find(|h| text.contains(h))
                    .expect("a site address in the Caddyfile");
                let site = substitute(&text, host, &format!("http://127.0.0.1:{port} {{"));
                // Global options for a test: no admin endpoint, no certificates.
                let config = format!("{{\n\tadmin off\n\tauto_https off\n}}\n\n{site}");
                let path = dir.path().join("Caddyfile");
                std::fs::write(&path, config).expect("write Caddyfile");
                let mut command = Command::new(program("caddy"));
                command
                    .args(["run", "--adapter", "caddyfile", "--config"])
                    .arg(&path)
                    .env("HOME", dir.path())
                    .env("XDG_DATA_HOME", dir.path().join("data"))
                    .env("XDG_CONFIG_HOME", dir.path().join("config"));
                command
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {kind:?}: {e}"));
        let started = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{kind:?} exited with {status}: {}", logs(dir.path()));
            }
            assert!(
                started.elapsed() < WAIT,
                "{kind:?} did not listen in time: {}",
                logs(dir.path())
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Proxy {
            _child: child,
            dir,
            port,
        }
    }

    /// `http://127.0.0.1:port` — the "app's origin".
    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn logs(&self) -> String {
        logs(self.dir.path())
    }
}

fn logs(dir: &Path) -> String {
    ["stderr.log", "error.log"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `$PATH`'s `name`, or a clear failure saying how to get it.
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: apt-get install nginx-light caddy (scripts/test does)")
        })
}

fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name)
}

/// `text` with every `from` replaced; fails if there is none, so that a deploy file
/// changed out of the shape the test expects is noticed, not silently untested.
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the deploy file has no {from:?}");
    text.replace(from, to)
}

async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A stand-in for the app behind the same proxy: answers every request with `app`.
async fn start_app() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\napp",
                    )
                    .await;
            });
        }
    });
    addr
}

/// A Dolores trusting loopback's proxies, with `base` as its base path ("" for none),
/// whose pages are served at `public` (the proxy's origin).
async fn start_dolores(base: &str, public: &str) -> Server {
    let mut args = vec![
        "--trusted-proxies",
        TRUSTED,
        "--heartbeat",
        "1s",
        "--public-origins",
        public,
    ];
    if !base.is_empty() {
        args.extend(["--base-path", base]);
    }
    Server::spawn_args(&args).await
}

/// `host:port` of a server (its URL may carry the base path).
fn host_port(server: &Server) -> String {
    server
        .addr()
        .split('/')
        .next()
        .expect("an address")
        .to_owned()
}

/// An HTTP client whose connections come from `from`.
fn client_from(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().expect("address"))
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

type Socket = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Opens a WebSocket to `url` from the address `from`, with `headers`; the handshake's
/// HTTP status when it is refused.
async fn websocket(from: &str, url: &str, headers: &[(&'static str, &str)]) -> Result<Socket, u16> {
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, value.parse().expect("header value"));
    }
    let uri = request.uri().clone();
    let target: SocketAddr = format!(
        "{}:{}",
        uri.host().expect("host"),
        uri.port_u16().expect("port")
    )
    .parse()
    .expect("socket address");
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from.parse().expect("address"), 0))
        .expect("bind the client end");
    let stream = within("connect", WAIT, socket.connect(target))
        .await
        .expect("connect");
    match within(
        "the websocket handshake",
        WAIT,
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("websocket to {url}: {e}"),
    }
}

/// The next JSON text frame (pings skipped).
async fn next_json(socket: &mut Socket) -> Value {
    loop {
        match within("a websocket frame", WAIT, socket.next()).await {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).expect("json"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Everything a browser and a backend use, through the proxy at `base` (its origin
/// plus the path Dolores is under there).
async fn check_every_endpoint(proxy: &Proxy, base: &str, dolores: &Server) {
    let http = client_from("127.0.0.1");
    let key = dolores.api_key();

    // The backend API.
    let track = format!(":proxy-{}", proxy.port);
    let uid = uid("proxied");
    let connected = http
        .post(format!("{base}/api/v1/connect"))
        .bearer_auth(key)
        .json(&json!({"uid": uid, "track": track}))
        .send()
        .await
        .expect("connect through the proxy");
    assert_eq!(connected.status(), StatusCode::OK, "{}", proxy.logs());
    let publish = |message: Value| {
        let http = http.clone();
        let url = format!("{base}/api/v1/update");
        let track = track.clone();
        async move {
            let answer = http
                .post(url)
                .bearer_auth(key)
                .json(&json!({"track": track, "message": message}))
                .send()
                .await
                .expect("update through the proxy");
            assert_eq!(answer.status(), StatusCode::OK);
            answer.json::<Value>().await.expect("json")["id"]
                .as_str()
                .expect("id")
                .to_owned()
        }
    };

    // Server-Sent Events, unbuffered: the message arrives while the stream stays open.
    let mut sse = Sse::open(&format!("{base}/listen/{uid}"), None)
        .await
        .unwrap_or_else(|refused| panic!("SSE through the proxy: {refused:?}"));
    let first = within("the first SSE block", WAIT, sse.next_block()).await;
    assert_eq!(first.retry.as_deref(), Some("2000"), "{first:?}");
    let id = publish(json!("over sse")).await;
    let event = within(
        "the event, streamed",
        Duration::from_secs(5),
        sse.next_event(),
    )
    .await;
    assert_eq!(
        (event.id.as_str(), &event.data["message"]),
        (id.as_str(), &json!("over sse"))
    );
    // Still open: a heartbeat (every second here) comes through too.
    let beat = sse.next_block_within(Duration::from_secs(5)).await;
    assert!(beat.is_some(), "the stream ended behind the proxy");
    drop(sse);

    // WebSocket, from a page on the proxy's own origin: the forwarded host makes it
    // same-origin.
    let ws_url = format!("{}/ws/{uid}", base.replacen("http", "ws", 1));
    let mut socket = websocket("127.0.0.1", &ws_url, &[("origin", &proxy.origin())])
        .await
        .unwrap_or_else(|status| panic!("same-origin WebSocket refused with {status}"));
    let id = publish(json!("over ws")).await;
    let frame = next_json(&mut socket).await;
    assert_eq!(
        (frame["id"].as_str(), &frame["message"]),
        (Some(id.as_str()), &json!("over ws"))
    );
    drop(socket);

    // Long-poll: it waits, then answers with what was published meanwhile.
    let poll_url = format!("{base}/poll/{uid}?timeout=20&last_event_id={id}");
    let started = Instant::now();
    let waiting = tokio::spawn({
        let http = http.clone();
        async move {
            http.get(poll_url)
                .send()
                .await
                .expect("poll")
                .json::<Value>()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "the poll answered before there was news"
    );
    let id = publish(json!("over poll")).await;
    let answer = within("the poll answer", WAIT, waiting)
        .await
        .expect("poll task")
        .expect("poll json");
    assert_eq!(
        answer["events"][0]["message"],
        json!("over poll"),
        "{answer}"
    );
    assert_eq!(answer["last_event_id"], json!(id));
    assert!(started.elapsed() >= Duration::from_millis(600));
    // And one that times out empty is answered, not cut.
    let empty: Value = http
        .get(format!("{base}/poll/{uid}?timeout=1.5&last_event_id={id}"))
        .send()
        .await
        .expect("empty poll")
        .json()
        .await
        .expect("json");
    assert_eq!(empty["events"], json!([]), "{empty}");

    // The client file and the status page, and what the page fetches.
    let js = http
        .get(format!("{base}/dolores.js"))
        .send()
        .await
        .expect("dolores.js");
    assert_eq!(js.status(), StatusCode::OK);
    let want = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js/dolores.js"),
    )
    .expect("read the client");
    assert_eq!(js.text().await.expect("body"), want);
    let page = http.get(format!("{base}/")).send().await.expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.expect("html").contains("./dolores.js"));
    let status: Value = http
        .get(format!("{base}/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status json");
    assert!(status["messages_published"].as_u64() >= Some(3), "{status}");
    let health = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);
}

/// The same-origin check and the logs use the forwarded client only from the proxy: a
/// browser on 127.0.0.2 at a foreign origin is refused, and named in the log by its own
/// address, whatever `X-Forwarded-For` it wrote itself.
async fn check_forwarded_client(proxy: &Proxy, base: &str, dolores: &Server) {
    let uid = uid("foreign");
    dolores.connect(&uid, ":foreign").await;
    let ws_url = format!("{}/ws/{uid}", base.replacen("http", "ws", 1));
    let refused = websocket(
        OUTSIDER,
        &ws_url,
        &[
            ("origin", "http://evil.example"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
        ],
    )
    .await;
    assert_eq!(
        refused.err(),
        Some(403),
        "a foreign origin through the proxy"
    );
    eventually(
        "the refusal in the log, naming the browser",
        WAIT,
        || async {
            dolores
                .stderr_text()
                .lines()
                .any(|l| {
                    l.contains("refused a WebSocket from 127.0.0.2 ") && l.contains("evil.example")
                })
                .then_some(())
        },
    )
    .await;
    assert!(
        !dolores.stderr_text().contains("from 6.6.6.6"),
        "a forged X-Forwarded-For named the client: {}",
        dolores.stderr_text()
    );
    // The same page on the proxy's own origin, from that browser, gets through.
    websocket(OUTSIDER, &ws_url, &[("origin", &proxy.origin())])
        .await
        .unwrap_or_else(|status| panic!("same-origin WebSocket refused with {status}"));
}

async fn behind(kind: Kind, file: &str, base: &str) {
    // The proxy's port first: it is the origin of the pages Dolores serves.
    let port = free_port().await;
    let dolores = start_dolores(base, &format!("http://127.0.0.1:{port}")).await;
    let app = start_app().await;
    let proxy = Proxy::start(kind, port, file, &host_port(&dolores), &app).await;
    let at = format!("{}{base}", proxy.origin());
    check_every_endpoint(&proxy, &at, &dolores).await;
    check_forwarded_client(&proxy, &at, &dolores).await;
    if !base.is_empty() {
        // The app is served beside Dolores, and the bare prefix leads to the page.
        let http = client_from("127.0.0.1");
        let app = http.get(proxy.origin()).send().await.expect("app");
        assert_eq!(app.text().await.expect("body"), "app");
        let page = http.get(&at).send().await.expect("bare prefix");
        assert_eq!(page.url().path(), format!("{base}/"));
        assert!(page.text().await.expect("html").contains("<!doctype html>"));
    }
}

#[tokio::test]
async fn nginx_in_front_with_a_base_path_serves_every_endpoint() {
    behind(Kind::Nginx, "nginx.conf", "/dolores").await;
}

#[tokio::test]
async fn nginx_in_front_on_its_own_host_serves_every_endpoint() {
    behind(Kind::Nginx, "nginx-subdomain.conf", "").await;
}

#[tokio::test]
async fn caddy_in_front_with_a_base_path_serves_every_endpoint() {
    behind(Kind::Caddy, "Caddyfile", "/dolores").await;
}

#[tokio::test]
async fn caddy_in_front_on_its_own_host_serves_every_endpoint() {
    behind(Kind::Caddy, "Caddyfile-subdomain", "").await;
}

#[tokio::test]
async fn forwarded_headers_count_only_from_a_trusted_peer() {
    let dolores = start_dolores("/dolores", "http://app.example").await;
    let uid = uid("forged");
    dolores.connect(&uid, ":forged").await;
    let url = format!("ws://{}/dolores/ws/{uid}", host_port(&dolores));
    // A page elsewhere that says, through its own forged headers, it is the app: the
    // forwarded host decides nothing, and the log names the browser, not 6.6.6.6.
    let forged = [
        ("origin", "http://evil.example"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-for", "6.6.6.6"),
    ];
    assert_eq!(websocket(OUTSIDER, &url, &forged).await.err(), Some(403));
    eventually("the refusal in the log", WAIT, || async {
        dolores
            .stderr_text()
            .contains("refused a WebSocket from 127.0.0.2 at origin \"http://evil.example\"")
            .then_some(())
    })
    .await;
    // Through a trusted proxy, the forwarded address names the browser; the origin
    // is still refused.
    let mut proxied = forged;
    proxied[3] = ("x-forwarded-for", "203.0.113.9");
    assert_eq!(
        websocket("127.0.0.1", &url, &proxied).await.err(),
        Some(403)
    );
    eventually("the refusal naming the proxied client", WAIT, || async {
        dolores
            .stderr_text()
            .contains("refused a WebSocket from 203.0.113.9 ")
            .then_some(())
    })
    .await;
    // The app's own pages, whoever carries them.
    websocket(OUTSIDER, &url, &[("origin", "http://app.example")])
        .await
        .unwrap_or_else(|status| panic!("a page at a public origin refused: {status}"));

    // The backend API names the client the same way when it refuses a key.
    let wrong = client_from(OUTSIDER)
        .get(format!("{}/api/v1/stats", dolores.url()))
        .bearer_auth("wrong")
        .header("x-forwarded-for", "6.6.6.6")
        .send()
        .await
        .expect("stats");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let proxied = client_from("127.0.0.1")
        .get(format!("{}/api/v1/stats", dolores.url()))
        .bearer_auth("wrong")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .expect("stats");
    assert_eq!(proxied.status(), StatusCode::UNAUTHORIZED);
    eventually("both refusals in the log", WAIT, || async {
        let log = dolores.stderr_text();
        (log.contains("refused GET /dolores/api/v1/stats from 127.0.0.2: wrong_api_key")
            && log.contains("refused GET /dolores/api/v1/stats from 203.0.113.9: wrong_api_key"))
        .then_some(())
    })
    .await;
    assert!(!dolores.stderr_text().contains("6.6.6.6"));
}

#[tokio::test]
async fn a_base_path_moves_every_route_and_the_direct_stream_path() {
    let dolores = start_dolores("/dolores/", "http://app.example").await;
    assert!(
        dolores.stdout_lines()[0].contains("listening on http://127.0.0.1:")
            && dolores.stdout_lines()[0].contains("/dolores ("),
        "{:?}",
        dolores.stdout_lines()
    );
    let root = format!("http://{}", host_port(&dolores));
    let http = client_from("127.0.0.1");
    for outside in [
        "/",
        "/healthz",
        "/listen/abcdefgh",
        "/api/v1/stats",
        "/doloresx/healthz",
    ] {
        let answer = http
            .get(format!("{root}{outside}"))
            .bearer_auth(dolores.api_key())
            .send()
            .await
            .expect("get");
        assert_eq!(answer.status(), StatusCode::NOT_FOUND, "{outside}");
        let body: Value = answer.json().await.expect("json 404");
        assert_eq!(body["error"]["code"], "not_found", "{outside}");
    }
    for inside in [
        "/dolores/",
        "/dolores/status",
        "/dolores/healthz",
        "/dolores/metrics",
        "/dolores/dolores.js",
    ] {
        let answer = http
            .get(format!("{root}{inside}"))
            .send()
            .await
            .expect("get");
        assert_eq!(answer.status(), StatusCode::OK, "{inside}");
    }
    // A stream as the first request of a connection takes the direct path: it too is
    // under the prefix, and only there.
    let uid = uid("direct");
    dolores.connect(&uid, ":direct").await;
    for (path, want) in [
        (format!("/dolores/listen/{uid}"), "200"),
        (format!("/listen/{uid}"), "404"),
    ] {
        let mut stream = TcpStream::connect(host_port(&dolores))
            .await
            .expect("connect");
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut head = vec![0u8; 256];
        let n = within("the answer", WAIT, stream.read(&mut head))
            .await
            .expect("read");
        let head = String::from_utf8_lossy(&head[..n]).into_owned();
        assert!(
            head.starts_with(&format!("HTTP/1.1 {want}")),
            "{path}: {head}"
        );
    }
}

#[test]
fn the_deploy_doc_shows_the_tested_files_as_they_are() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/deploy.md")).expect("read docs/deploy.md");
    for file in [
        "nginx.conf",
        "nginx-subdomain.conf",
        "Caddyfile",
        "Caddyfile-subdomain",
    ] {
        let text = std::fs::read_to_string(deploy_file(file)).expect("read the deploy file");
        assert!(
            doc.contains(&format!("\n{text}```")),
            "docs/deploy.md does not show deploy/{file} as it is"
        );
    }
}
