//! The client subcommands: talk to a running server over its HTTP API.
//!
//! Run beside a local server they find its generated api key in the data dir by
//! themselves. Every failure is one line and a non-zero exit code.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::auth::Tokens;
use crate::config::{ClientOptions, KeyOptions, Settings};

/// Longest a backend call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause between reconnects of `listen`.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Where a client's api key came from. A 401 says it: the usual cause is a stale key,
/// like the file an earlier `dolores serve` generated while this one runs with
/// `--api-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// `--api-key`.
    Flag,
    /// `DOLORES_API_KEY`.
    Env,
    /// `api_key` in this config file.
    ConfigFile(PathBuf),
    /// The key file a local server generated.
    Generated(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flag => f.write_str("--api-key"),
            Self::Env => f.write_str("DOLORES_API_KEY"),
            Self::ConfigFile(path) => write!(f, "api_key in {}", path.display()),
            Self::Generated(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The server a client subcommand talks to, and the key it was given.
#[derive(Debug)]
pub(crate) struct Target {
    settings: Settings,
    /// The key given by flag, variable or config file, and which.
    given: Option<(String, KeySource)>,
}

impl Target {
    /// `settings` resolved from `client` and `key` (see `Settings::resolve_client`).
    pub(crate) fn new(
        settings: Settings,
        client: &ClientOptions,
        key: Option<&KeyOptions>,
    ) -> Self {
        let given = settings.api_key.clone().map(|api_key| {
            let flag_or_env = key.and_then(|k| k.api_key.as_deref()) == Some(api_key.as_str());
            let source = if !flag_or_env {
                KeySource::ConfigFile(client.config.clone().unwrap_or_default())
            } else if std::env::var("DOLORES_API_KEY").ok().as_deref() == Some(api_key.as_str()) {
                // Given both ways with the same value, either answer is right.
                KeySource::Env
            } else {
                KeySource::Flag
            };
            (api_key, source)
        });
        Self { settings, given }
    }

    /// The api key and where it came from: given, else the one a local server generated.
    fn api_key(&self) -> anyhow::Result<(String, KeySource)> {
        if let Some(given) = &self.given {
            return Ok(given.clone());
        }
        let file = self.settings.api_key_file();
        let key = api_key_or_file(None, &file)?;
        Ok((key, KeySource::Generated(file)))
    }
}

/// The api key given, else the one a local server generated into `key_file`.
pub(super) fn api_key_or_file(given: Option<&str>, key_file: &Path) -> anyhow::Result<String> {
    if let Some(key) = given {
        return Ok(key.to_owned());
    }
    match std::fs::read_to_string(key_file) {
        Ok(key) if !key.trim().is_empty() => Ok(key.trim().to_owned()),
        _ => bail!(
            "no api key: pass --api-key or set DOLORES_API_KEY (a local server keeps its \
             generated key in {})",
            key_file.display()
        ),
    }
}

async fn call(target: &Target, path: &str, body: Value) -> anyhow::Result<Value> {
    let url = format!("{}/api/v1/{path}", target.settings.server_url());
    request(target, reqwest::Client::new().post(&url).json(&body)).await
}

/// `GET /api/v1/tracks/{track}{rest}` with `query`, the track as one percent-encoded
/// path segment.
async fn get_track(
    target: &Target,
    track: &str,
    rest: &str,
    query: &[(&str, String)],
) -> anyhow::Result<Value> {
    let base = target.settings.server_url();
    let mut url = reqwest::Url::parse(&format!("{base}/api/v1/tracks"))
        .with_context(|| format!("bad server URL {base}"))?;
    url.path_segments_mut()
        .map_err(|()| anyhow!("bad server URL {base}"))?
        .push(track);
    url.set_path(&format!("{}{rest}", url.path()));
    if !query.is_empty() {
        url.query_pairs_mut()
            .extend_pairs(query.iter().map(|(k, v)| (k, v.as_str())));
    }
    request(target, reqwest::Client::new().get(url)).await
}

/// Sends a backend call with the api key; its JSON answer, or a one-line error.
async fn request(target: &Target, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let settings = &target.settings;
    let (api_key, source) = target.api_key()?;
    let response = request
        .bearer_auth(api_key)
        .timeout(CALL_TIMEOUT)
        .send()
        .await
        .map_err(|e| {
            anyhow!(
                "cannot reach the server at {}: {}",
                settings.server_url(),
                causes(&e)
            )
        })?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status == reqwest::StatusCode::UNAUTHORIZED {
        let hint = match source {
            KeySource::Flag | KeySource::Env => "",
            KeySource::ConfigFile(_) | KeySource::Generated(_) => {
                "; pass --api-key or set DOLORES_API_KEY"
            }
        };
        bail!(
            "{} (HTTP 401; the key came from {source}{hint})",
            describe_code(&body)
        );
    }
    if !status.is_success() {
        bail!("{}", describe_error(status, &body));
    }
    Ok(body)
}

/// `code: message` of an error answer.
fn describe_code(body: &Value) -> String {
    let code = body["error"]["code"].as_str().unwrap_or("error");
    let message = body["error"]["message"].as_str().unwrap_or("");
    format!("{code}: {message}")
}

fn describe_error(status: reqwest::StatusCode, body: &Value) -> String {
    format!("{} (HTTP {})", describe_code(body), status.as_u16())
}

/// `dolores update TRACK MESSAGE`.
pub(crate) async fn update(
    target: Target,
    track: String,
    message: String,
    as_string: bool,
) -> anyhow::Result<()> {
    let message = if as_string {
        Value::String(message)
    } else {
        serde_json::from_str(&message).unwrap_or(Value::String(message))
    };
    let answer = call(
        &target,
        "update",
        json!({"track": track, "message": message}),
    )
    .await?;
    println!("{answer}");
    Ok(())
}

/// `dolores connect UID TRACK`.
pub(crate) async fn connect(target: Target, uid: String, track: String) -> anyhow::Result<()> {
    let answer = call(&target, "connect", json!({"uid": uid, "track": track})).await?;
    println!("{answer}");
    Ok(())
}

/// `dolores disconnect UID [TRACK]`.
pub(crate) async fn disconnect(
    target: Target,
    uid: String,
    track: Option<String>,
) -> anyhow::Result<()> {
    let body = match track {
        Some(track) => json!({"uid": uid, "track": track}),
        None => json!({"uid": uid}),
    };
    let answer = call(&target, "disconnect", body).await?;
    println!("{answer}");
    Ok(())
}

/// `dolores track TRACK`: its counts, `{"track", "subscribers", "online"}`; with
/// `listeners`, then each listener (`online`: only those online) as a JSON line, every
/// page followed.
pub(crate) async fn track(
    target: Target,
    track: String,
    listeners: bool,
    online: bool,
) -> anyhow::Result<()> {
    println!("{}", get_track(&target, &track, "", &[]).await?);
    if !listeners {
        return Ok(());
    }
    let mut query = vec![("limit", crate::api::tracks::MAX_PAGE.to_string())];
    if online {
        query.push(("online", "true".into()));
    }
    loop {
        let page = get_track(&target, &track, "/listeners", &query).await?;
        for listener in page["listeners"].as_array().into_iter().flatten() {
            println!("{listener}");
        }
        match page["next"].as_str() {
            Some(next) => {
                query.retain(|(key, _)| *key != "after");
                query.push(("after", next.to_owned()));
            }
            None => return Ok(()),
        }
    }
}

/// `dolores history TRACK [--after ID]`: what the server keeps of the track, one
/// `{"id", "track", "message"}` per line in order, every page followed. A reset (`after`
/// older than what is kept) is said on stderr, before what is kept.
pub(crate) async fn history(
    target: Target,
    track: String,
    after: Option<String>,
) -> anyhow::Result<()> {
    let mut query = vec![("limit", crate::api::tracks::MAX_PAGE.to_string())];
    if let Some(after) = &after {
        query.push(("after", after.clone()));
    }
    let mut first = true;
    loop {
        let page = get_track(&target, &track, "/messages", &query).await?;
        if first && page["reset"] == true {
            eprintln!(
                "dolores: reset: messages after {} are no longer kept; what is kept follows",
                after.as_deref().unwrap_or("0")
            );
        }
        first = false;
        for message in page["messages"].as_array().into_iter().flatten() {
            println!("{message}");
        }
        match page["next"].as_str() {
            Some(next) => {
                query.retain(|(key, _)| *key != "after");
                query.push(("after", next.to_owned()));
            }
            None => return Ok(()),
        }
    }
}

/// `dolores token UID [--track T]…`.
pub(crate) async fn token(
    target: Target,
    uid: String,
    tracks: Vec<String>,
    ttl: Duration,
) -> anyhow::Result<()> {
    crate::names::check_uid(&uid)?;
    let tracks = (!tracks.is_empty()).then_some(tracks);
    let ttl = ttl.as_secs().max(1);
    let token = match &target.settings.token_secret {
        Some(secret) => Tokens::new(secret)
            .mint(&uid, tracks, ttl)
            .context("cannot sign the token")?,
        None => {
            let answer = call(
                &target,
                "tokens",
                json!({"uid": uid, "tracks": tracks, "ttl_seconds": ttl}),
            )
            .await?;
            answer["token"].as_str().unwrap_or_default().to_owned()
        }
    };
    println!("{token}");
    Ok(())
}

/// `dolores listen UID`: prints `{"id", "track", "message"}` (or `{"id", "reset": true}`)
/// per event, one per line; reconnects with the last id after every drop.
pub(crate) async fn listen(
    target: Target,
    uid: String,
    token: Option<String>,
    mut last_id: Option<String>,
) -> anyhow::Result<()> {
    let settings = &target.settings;
    let base = format!("{}/listen/{uid}", settings.server_url());
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let mut backoff = Duration::from_millis(250);
    loop {
        // A token is base64url and dots: safe in a query string as it is.
        let url = match &token {
            Some(token) => format!("{base}?token={token}"),
            None => base.clone(),
        };
        let mut request = client.get(&url);
        if let Some(id) = &last_id {
            request = request.header("Last-Event-ID", id);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                backoff = Duration::from_millis(250);
                let mut parser = SseParser::default();
                let mut body = response.bytes_stream();
                while let Some(chunk) = body.next().await {
                    let Ok(chunk) = chunk else { break };
                    for event in parser.feed(&chunk) {
                        if let Some(id) = &event.id {
                            last_id = Some(id.clone());
                        }
                        print_event(&event);
                    }
                }
                eprintln!("dolores: stream ended; reconnecting");
            }
            Ok(response) => {
                let status = response.status();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                if status.is_client_error() {
                    bail!("{}", describe_error(status, &body));
                }
                eprintln!("dolores: {}; retrying", describe_error(status, &body));
            }
            Err(e) => eprintln!(
                "dolores: cannot reach {}: {}; retrying",
                settings.server_url(),
                causes(&e)
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn print_event(event: &SseEvent) {
    let id = event.id.clone().map_or(Value::Null, Value::String);
    let line = if event.name == "reset" {
        json!({"id": id, "reset": true})
    } else {
        match serde_json::from_str::<Value>(&event.data) {
            Ok(Value::Object(mut data)) => {
                data.insert("id".into(), id);
                Value::Object(data)
            }
            _ => json!({"id": id, "data": event.data}),
        }
    };
    println!("{line}");
}

/// One Server-Sent Event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// `id:`, if the event had one.
    pub id: Option<String>,
    /// `event:`, or `message`.
    pub name: String,
    /// The `data:` lines joined with newlines.
    pub data: String,
}

/// A minimal Server-Sent Events parser: enough for what Dolores sends.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buffer: Vec<u8>,
    event: SseEvent,
    has_data: bool,
}

impl SseParser {
    /// Feeds bytes; returns the events they complete.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if self.has_data {
                    let mut event = std::mem::take(&mut self.event);
                    if event.name.is_empty() {
                        event.name = "message".into();
                    }
                    events.push(event);
                }
                self.event = SseEvent::default();
                self.has_data = false;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => self.event.id = Some(value.to_owned()),
                "event" => self.event.name = value.to_owned(),
                "data" => {
                    if self.has_data {
                        self.event.data.push('\n');
                    }
                    self.event.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        events
    }
}

/// An error and its causes on one line, each said once: reqwest's own text ("error
/// sending request") hides the cause that matters ("connection refused", "invalid
/// peer certificate").
pub(crate) fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_across_chunks() {
        let mut parser = SseParser::default();
        assert!(parser.feed(b"retry: 2000\n: hi\n\nid: 1\nda").is_empty());
        let events = parser.feed(b"ta: {\"a\":1}\n\nid: 2\nevent: reset\ndata: x\n\n");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].id.as_deref(), Some("1"));
        assert_eq!(events[0].data, "{\"a\":1}");
        assert_eq!(events[1].name, "reset");
    }
}
