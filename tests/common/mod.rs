//! Helpers shared by the integration tests: a [`Server`] that runs the real `dolores`
//! binary on a loopback port, and an [`Sse`] client for `/listen/{uid}`.
//!
//! Every wait here is bounded ([`WAIT`] unless said otherwise) so that no test can hang:
//! a wait that runs out panics with what it was waiting for.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The longest any single wait in a test may take.
pub(crate) const WAIT: Duration = Duration::from_secs(10);
/// The api key the tests pass with `--api-key` unless they test something else.
pub(crate) const API_KEY: &str = "test-api-key";

/// The path of the binary under test.
pub(crate) fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dolores"))
}

/// A `dolores` command with no `DOLORES_*` variable inherited from the environment
/// (so the developer's own settings cannot change what a test sees).
pub(crate) fn command() -> Command {
    let mut command = Command::new(binary());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DOLORES_") {
            command.env_remove(key);
        }
    }
    command.env("NO_COLOR", "1");
    command.stdin(Stdio::null());
    command.kill_on_drop(true);
    command
}

/// Gives reqwest its TLS crypto (the crate builds it without one, as the binary
/// installs ring at start). Call before building a client; repeating is harmless.
pub(crate) fn install_crypto() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
}

/// A TLS config with no roots, made once: the default one reads the system's
/// certificates for every client, and a test that opens 500 streams makes 500 clients.
/// Only the HTTPS tests need roots, and they bring their own.
pub(crate) fn plain_tls() -> tokio_rustls::rustls::ClientConfig {
    use std::sync::OnceLock;
    use tokio_rustls::rustls;
    static CONFIG: OnceLock<rustls::ClientConfig> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        .clone()
}

/// A unique, valid uid (8–128 chars of `A-Za-z0-9-_.`).
pub(crate) fn uid(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n:04}", std::process::id())
}

/// Waits until `check` returns `Some`, polling every 20 ms, at most `within`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `future` with a deadline; panics naming `what` when it runs out.
pub(crate) async fn within<T>(
    what: &str,
    limit: Duration,
    future: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// How to start a server.
#[derive(Debug, Clone)]
pub(crate) struct ServerConfig {
    /// `--memory` instead of a data dir.
    pub(crate) memory: bool,
    /// `--api-key` (none: let the server generate one).
    pub(crate) api_key: Option<String>,
    /// Extra command-line arguments.
    pub(crate) args: Vec<String>,
    /// Extra environment variables.
    pub(crate) env: Vec<(String, String)>,
    /// Pass only `args`: no `--listen`, `--data`/`--memory` or `--api-key` (the test
    /// sets them some other way, like a config file or the environment).
    pub(crate) bare: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            memory: false,
            api_key: Some(API_KEY.to_owned()),
            args: Vec::new(),
            env: Vec::new(),
            bare: false,
        }
    }
}

impl ServerConfig {
    /// Adds command-line arguments.
    pub(crate) fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable.
    pub(crate) fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// In memory, nothing on disk.
    pub(crate) fn memory(mut self) -> Self {
        self.memory = true;
        self
    }

    /// Without `--api-key`.
    pub(crate) fn no_api_key(mut self) -> Self {
        self.api_key = None;
        self
    }

    /// Passes only the given arguments; `api_key` is the key the server will use (set
    /// by a config file or the environment), `None` when it generates one.
    pub(crate) fn bare(mut self, api_key: Option<&str>) -> Self {
        self.bare = true;
        self.api_key = api_key.map(str::to_owned);
        self
    }

    /// Starts the server.
    pub(crate) async fn start(self) -> Server {
        Server::start_with(self).await
    }
}

/// A running `dolores serve` on a loopback port, killed when dropped.
#[derive(Debug)]
pub(crate) struct Server {
    config: ServerConfig,
    data: Arc<tempfile::TempDir>,
    child: Option<Child>,
    addr: String,
    api_key: String,
    stdout_lines: Vec<String>,
    stderr: Arc<Mutex<String>>,
    client: reqwest::Client,
}

impl Server {
    /// A server with the defaults: a fresh data dir and [`API_KEY`].
    pub(crate) async fn start() -> Server {
        ServerConfig::default().start().await
    }

    /// A server with extra arguments.
    pub(crate) async fn start_args(args: &[&str]) -> Server {
        ServerConfig::default()
            .args(args.iter().copied())
            .start()
            .await
    }

    /// The settings to start from.
    pub(crate) fn config() -> ServerConfig {
        ServerConfig::default()
    }

    /// Starts a server as `config` says.
    pub(crate) async fn start_with(config: ServerConfig) -> Server {
        install_crypto();
        let data = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut server = Server {
            config,
            data,
            child: None,
            addr: String::new(),
            api_key: String::new(),
            stdout_lines: Vec::new(),
            stderr: Arc::default(),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
        };
        server.spawn().await;
        server
    }

    /// The server's working directory (kept across restarts, deleted when the server is
    /// dropped).
    pub(crate) fn work_dir(&self) -> &Path {
        self.data.path()
    }

    /// The data dir passed with `--data` (unless bare or in memory).
    pub(crate) fn store_dir(&self) -> PathBuf {
        self.data.path().join("store")
    }

    fn serve_command(&self) -> Command {
        let mut command = command();
        // Relative paths (like the default ./dolores-data) land in the temp dir.
        command.current_dir(self.data.path());
        command.arg("serve");
        if !self.config.bare {
            command.args(["--listen", "127.0.0.1:0"]);
            if self.config.memory {
                command.arg("--memory");
            } else {
                command.arg("--data").arg(self.data.path().join("store"));
            }
            if let Some(key) = &self.config.api_key {
                command.args(["--api-key", key]);
            }
        }
        command.args(&self.config.args);
        for (key, value) in &self.config.env {
            command.env(key, value);
        }
        command
    }

    async fn spawn(&mut self) {
        let mut command = self.serve_command();
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn dolores serve");
        let stderr = child.stderr.take().expect("stderr");
        self.stderr = Arc::default();
        let sink = self.stderr.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut text) = sink.lock() {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(WAIT, lines.next_line()).await;
        let first = match first {
            Ok(Ok(Some(line))) => line,
            other => {
                let status = child.try_wait();
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!(
                    "the server printed no first line ({other:?}, status {status:?}); stderr:\n{}",
                    self.stderr_text()
                );
            }
        };
        let addr = first
            .split("listening on http://")
            .nth(1)
            .or_else(|| first.split("listening on https://").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {first:?}"))
            .to_owned();
        let mut stdout_lines = vec![first];
        if self.config.api_key.is_none() {
            // The generated key is printed on the next line.
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("api key line in time")
                .expect("read stdout")
                .expect("an api key line");
            stdout_lines.push(line);
        }
        // Keep draining stdout so the server can never block on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.api_key = match &self.config.api_key {
            Some(key) => key.clone(),
            None => stdout_lines[1]
                .strip_prefix("api key: ")
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("no api key line: {:?}", stdout_lines[1]))
                .to_owned(),
        };
        self.addr = addr;
        self.stdout_lines = stdout_lines;
        self.child = Some(child);
    }

    /// `host:port`.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://host:port` (`https://` when the server serves HTTPS).
    pub(crate) fn url(&self) -> String {
        let scheme = if self.stdout_lines[0].contains("https://") {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The api key the backend API takes.
    pub(crate) fn api_key(&self) -> &str {
        &self.api_key
    }

    /// What the server printed on stdout before serving.
    pub(crate) fn stdout_lines(&self) -> &[String] {
        &self.stdout_lines
    }

    /// What the server logged so far.
    pub(crate) fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .expect("the server is running")
    }

    /// The shared HTTP client (30 s timeout per request).
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `POST /api/v1/{path}` with a JSON body and the api key.
    pub(crate) async fn api(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .client
            .post(format!("{}/api/v1/{path}", self.url()))
            .bearer_auth(&self.api_key)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /api/v1/{path}: {e}"));
        read_json(response).await
    }

    /// `GET {path}` (path from the root) with the api key.
    pub(crate) async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.url()))
            .bearer_auth(&self.api_key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        read_json(response).await
    }

    /// Publishes one message; returns its id as a number.
    pub(crate) async fn publish(&self, track: &str, message: Value) -> u64 {
        let (status, body) = self
            .api("update", json!({"track": track, "message": message}))
            .await;
        assert_eq!(status, StatusCode::OK, "update: {body}");
        id_of(&body["id"])
    }

    /// Publishes a batch; returns the ids.
    pub(crate) async fn publish_batch(&self, updates: &[(&str, Value)]) -> Vec<u64> {
        let updates: Vec<Value> = updates
            .iter()
            .map(|(track, message)| json!({"track": track, "message": message}))
            .collect();
        let (status, body) = self.api("update", json!({"updates": updates})).await;
        assert_eq!(status, StatusCode::OK, "batch update: {body}");
        body["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(id_of)
            .collect()
    }

    /// Subscribes `uid` to `track`; returns its tracks.
    pub(crate) async fn connect(&self, uid: &str, track: &str) -> Vec<String> {
        let (status, body) = self
            .api("connect", json!({"uid": uid, "track": track}))
            .await;
        assert_eq!(status, StatusCode::OK, "connect: {body}");
        strings(&body["tracks"])
    }

    /// `GET /api/v1/listeners/{uid}`.
    pub(crate) async fn listener(&self, uid: &str) -> (StatusCode, Value) {
        self.get(&format!("/api/v1/listeners/{uid}")).await
    }

    /// `GET /api/v1/stats`.
    pub(crate) async fn stats(&self) -> Value {
        let (status, body) = self.get("/api/v1/stats").await;
        assert_eq!(status, StatusCode::OK, "stats: {body}");
        body
    }

    /// Whether `GET /healthz` answers 200.
    pub(crate) async fn healthy(&self) -> bool {
        matches!(
            self.client.get(format!("{}/healthz", self.url())).send().await,
            Ok(r) if r.status() == StatusCode::OK
        )
    }

    /// Opens `/listen/{uid}` with no cursor; panics unless it answers 200.
    pub(crate) async fn listen(&self, uid: &str) -> Sse {
        Sse::open(&self.listen_url(uid, ""), None)
            .await
            .expect("open stream")
    }

    /// The listen URL for `uid`, with `query` (like `"?last_event_id=3"`) appended.
    pub(crate) fn listen_url(&self, uid: &str, query: &str) -> String {
        format!("{}/listen/{uid}{query}", self.url())
    }

    /// The server's resident memory in KiB, from /proc.
    pub(crate) fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits");
        // SAFETY: sends a signal to our own child process; no memory is touched.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Kills the server with SIGKILL (no chance to flush anything) and reaps it.
    pub(crate) async fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let mut child = self.child.take().expect("running");
        let status = within("the killed server to exit", WAIT, child.wait())
            .await
            .expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "{status:?}"
        );
    }

    /// Sends SIGTERM and returns the exit status (panics if the server takes longer
    /// than `limit` to exit).
    pub(crate) async fn terminate_within(&mut self, limit: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        within("the server to exit after SIGTERM", limit, child.wait())
            .await
            .expect("wait")
    }

    /// Sends SIGTERM and returns the exit status.
    pub(crate) async fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(WAIT).await
    }

    /// Starts the server again with the same settings and data dir (on a new port).
    /// The previous process must be gone (see [`Server::kill9`], [`Server::terminate`]).
    pub(crate) async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server before restarting it");
        self.spawn().await;
    }
}

/// Reads a JSON answer: its status and its body (`Value::Null` when not JSON).
pub(crate) async fn read_json(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("read body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, body)
}

/// Checks an error answer: the status, the `{"error": {"code", "message"}}` shape and
/// the code.
#[track_caller]
pub(crate) fn assert_error(answer: &(StatusCode, Value), status: u16, code: &str) {
    let (got, body) = answer;
    assert_eq!(got.as_u16(), status, "status for {code}: body {body}");
    assert_eq!(body["error"]["code"], code, "code: body {body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(!message.is_empty(), "an error message for people: {body}");
}

/// An event id as a number (ids are decimal strings).
#[track_caller]
pub(crate) fn id_of(value: &Value) -> u64 {
    value
        .as_str()
        .unwrap_or_else(|| panic!("an id is a string: {value}"))
        .parse()
        .unwrap_or_else(|_| panic!("an id is decimal: {value}"))
}

/// A JSON array of strings.
pub(crate) fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("an array: {value}"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------------

/// One block of an event stream (up to a blank line), with its comments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Block {
    /// `id:`.
    pub(crate) id: Option<String>,
    /// `event:`.
    pub(crate) event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub(crate) data: Option<String>,
    /// `retry:`.
    pub(crate) retry: Option<String>,
    /// Comment lines (`: text`), without the colon and the space.
    pub(crate) comments: Vec<String>,
}

/// An event: a block with data.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    /// The event id, as sent.
    pub(crate) id: String,
    /// `message` or `reset`.
    pub(crate) kind: String,
    /// The data, parsed as JSON.
    pub(crate) data: Value,
}

impl Event {
    /// The id as a number.
    pub(crate) fn pos(&self) -> u64 {
        self.id
            .parse()
            .unwrap_or_else(|_| panic!("decimal event id: {self:?}"))
    }

    /// Whether this is a reset.
    pub(crate) fn is_reset(&self) -> bool {
        self.kind == "reset"
    }

    /// The message's track.
    pub(crate) fn track(&self) -> &str {
        self.data["track"].as_str().unwrap_or("")
    }

    /// The message.
    pub(crate) fn message(&self) -> &Value {
        &self.data["message"]
    }
}

/// Parses the text of an event stream into blocks.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buffer: Vec<u8>,
    block: Block,
    touched: bool,
}

impl SseParser {
    /// Feeds bytes; returns the blocks they complete.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<Block> {
        self.buffer.extend_from_slice(bytes);
        let mut blocks = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8(raw).expect("event streams are UTF-8");
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if self.touched {
                    blocks.push(std::mem::take(&mut self.block));
                }
                self.touched = false;
                continue;
            }
            self.touched = true;
            if let Some(comment) = line.strip_prefix(':') {
                self.block
                    .comments
                    .push(comment.strip_prefix(' ').unwrap_or(comment).to_owned());
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match field {
                "id" => self.block.id = Some(value),
                "event" => self.block.event = Some(value),
                "retry" => self.block.retry = Some(value),
                "data" => match &mut self.block.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(&value);
                    }
                    None => self.block.data = Some(value),
                },
                other => panic!("unexpected field {other:?} in the event stream"),
            }
        }
        blocks
    }

    /// Bytes received after the last complete line.
    pub(crate) fn leftover(&self) -> &[u8] {
        &self.buffer
    }
}

#[derive(Debug)]
enum Item {
    Block(Block),
    /// The body ended: cleanly, or with this error.
    End(Result<(), String>),
}

/// An open `/listen/{uid}` stream, read in the background; dropping it closes the
/// connection.
#[derive(Debug)]
pub(crate) struct Sse {
    /// The response headers.
    pub(crate) headers: reqwest::header::HeaderMap,
    rx: mpsc::UnboundedReceiver<Item>,
    ended: Option<Result<(), String>>,
    task: tokio::task::JoinHandle<()>,
}

/// A listener endpoint's refusal.
#[derive(Debug)]
pub(crate) struct Refused {
    /// The status.
    pub(crate) status: StatusCode,
    /// The JSON body (`Null` if not JSON).
    pub(crate) body: Value,
}

impl Refused {
    /// As the pair [`assert_error`] takes.
    pub(crate) fn answer(&self) -> (StatusCode, Value) {
        (self.status, self.body.clone())
    }
}

/// A client for one stream. Not shared: every test has its own runtime, and a
/// connection must not outlive the runtime that made it.
fn sse_client() -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(plain_tls())
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .expect("sse client")
}

impl Drop for Sse {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sse {
    /// Opens `url` (a full `/listen/...` URL), sending `Last-Event-ID: last_event_id`
    /// when given. A non-200 answer is returned as [`Refused`].
    pub(crate) async fn open(url: &str, last_event_id: Option<&str>) -> Result<Sse, Refused> {
        let mut request = sse_client().get(url);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = within("the stream's response headers", WAIT, request.send())
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        if response.status() != StatusCode::OK {
            let (status, body) = read_json(response).await;
            return Err(Refused { status, body });
        }
        let headers = response.headers().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut parser = SseParser::default();
            let mut body = response.bytes_stream();
            let end = loop {
                match body.next().await {
                    Some(Ok(chunk)) => {
                        for block in parser.feed(&chunk) {
                            if tx.send(Item::Block(block)).is_err() {
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => break Err(format!("{e:?}")),
                    None if parser.leftover().is_empty() => break Ok(()),
                    None => {
                        break Err(format!(
                            "the stream ended inside a line: {:?}",
                            String::from_utf8_lossy(parser.leftover())
                        ));
                    }
                }
            };
            let _ = tx.send(Item::End(end));
        });
        Ok(Sse {
            headers,
            rx,
            ended: None,
            task,
        })
    }

    /// The next block, or `None` once the stream has ended; panics after `limit`.
    pub(crate) async fn next_block_within(&mut self, limit: Duration) -> Option<Block> {
        self.try_next_block(limit)
            .await
            .unwrap_or_else(|| panic!("no block within {limit:?}"))
    }

    /// The next block (`Some(None)`: the stream ended), or `None` if nothing came
    /// within `limit`.
    pub(crate) async fn try_next_block(&mut self, limit: Duration) -> Option<Option<Block>> {
        if self.ended.is_some() {
            return Some(None);
        }
        match tokio::time::timeout(limit, self.rx.recv()).await {
            Err(_) => None,
            Ok(None) => {
                self.ended = Some(Err("the reader task stopped".into()));
                Some(None)
            }
            Ok(Some(Item::Block(block))) => Some(Some(block)),
            Ok(Some(Item::End(end))) => {
                self.ended = Some(end);
                Some(None)
            }
        }
    }

    /// The next block; panics after [`WAIT`] or if the stream ended.
    pub(crate) async fn next_block(&mut self) -> Block {
        self.next_block_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("the stream ended: {:?}", self.ended))
    }

    /// The next event (a block with data), skipping comments and `retry:`; `None` if
    /// nothing came within `limit`. Panics if the stream ends.
    pub(crate) async fn try_next_event(&mut self, limit: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_next_block(left).await {
                None => return None,
                Some(None) => panic!("the stream ended: {:?}", self.ended),
                Some(Some(block)) => {
                    if let Some(event) = to_event(block) {
                        return Some(event);
                    }
                }
            }
        }
    }

    /// The next event; panics after [`WAIT`].
    pub(crate) async fn next_event(&mut self) -> Event {
        match self.try_next_event(WAIT).await {
            Some(event) => event,
            None => panic!("no event within {WAIT:?}"),
        }
    }

    /// The next `n` events.
    pub(crate) async fn events(&mut self, n: usize) -> Vec<Event> {
        let mut events = Vec::with_capacity(n);
        for i in 0..n {
            match self.try_next_event(WAIT).await {
                Some(event) => events.push(event),
                None => panic!("got {i} of {n} events, then nothing for {WAIT:?}: {events:?}"),
            }
        }
        events
    }

    /// Asserts that no event comes within `quiet`.
    pub(crate) async fn assert_no_event(&mut self, quiet: Duration) {
        if let Some(event) = self.try_next_event(quiet).await {
            panic!("unexpected event {event:?}");
        }
    }

    /// Waits for the stream to end (at most `limit`); returns the blocks that came
    /// first and whether the body ended cleanly.
    pub(crate) async fn end_within(&mut self, limit: Duration) -> (Vec<Block>, Result<(), String>) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut blocks = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_next_block(left).await {
                None => panic!("the stream did not end within {limit:?}; got {blocks:?}"),
                Some(None) => return (blocks, self.ended.clone().expect("ended")),
                Some(Some(block)) => blocks.push(block),
            }
        }
    }
}

/// A block with data as an [`Event`].
pub(crate) fn to_event(block: Block) -> Option<Event> {
    let data = block.data?;
    Some(Event {
        id: block.id.unwrap_or_default(),
        kind: block.event.unwrap_or_else(|| "message".into()),
        data: serde_json::from_str(&data)
            .unwrap_or_else(|e| panic!("event data is JSON ({e}): {data:?}")),
    })
}

/// The ids of `events`, as numbers.
pub(crate) fn positions(events: &[Event]) -> Vec<u64> {
    events.iter().map(Event::pos).collect()
}

/// Reads one HTTP/1.1 response with a `content-length` from a raw socket (at most
/// [`WAIT`]); returns the status and the body parsed as JSON (`Null` if it is not).
pub(crate) async fn read_response(stream: &mut tokio::net::TcpStream) -> (u16, Value) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("a content-length: {head:?}"));
            if data.len() >= end + 4 + length {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("a status line: {head:?}"));
                let body =
                    serde_json::from_slice(&data[end + 4..end + 4 + length]).unwrap_or(Value::Null);
                return (status, body);
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => data.extend_from_slice(&buf[..n]),
            other => panic!(
                "the response was cut ({other:?}) after {:?}",
                String::from_utf8_lossy(&data)
            ),
        }
    }
}
