//! Server-Sent Events: a parser for the text of an event stream ([`SseParser`]) and a
//! client for `/listen/{uid}` that reads a stream in the background ([`Sse`]).

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::mpsc;

use super::http::{plain_tls, read_json};
use super::wait::{WAIT, within};

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
