//! Talking HTTP to a server: the backend API calls a test makes ([`Server::api`],
//! [`Server::publish`], …), reading and checking JSON answers, reading a response from a
//! raw socket, and the TLS setup reqwest needs.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use super::server::Server;
use super::sse::Sse;
use super::wait::WAIT;

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

impl Server {
    /// `POST /api/v1/{path}` with a JSON body and the api key.
    pub(crate) async fn api(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .client()
            .post(format!("{}/api/v1/{path}", self.url()))
            .bearer_auth(self.api_key())
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /api/v1/{path}: {e}"));
        read_json(response).await
    }

    /// `GET {path}` (path from the root) with the api key.
    pub(crate) async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .client()
            .get(format!("{}{path}", self.url()))
            .bearer_auth(self.api_key())
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
            self.client().get(format!("{}/healthz", self.url())).send().await,
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
