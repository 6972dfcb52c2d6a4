//! The store: one ordered log of messages, and the listeners with their subscriptions
//! and delivery cursors.
//!
//! [`Engine`] is the seam. It knows nothing of HTTP, transports or open streams; it
//! stores, answers reads, and reports every change it commits, in commit order, to a
//! [`Tail`] (the hub of this node). Implementations:
//!
//! - `memory` — nothing on disk (`--memory`);
//! - `logstore` — the durable default: messages in an append-only segment log
//!   (`segment`: its files, frames and recovery), listeners in a redb file beside it
//!   (`embedded`'s tables);
//!
//! both driven by the one writer in `local`, which does group commit; and
//!
//! - `redis` — several nodes on one Redis (`--redis URL`), through `redis_connection`
//!   (one server, or the primary Sentinel names).
//!
//! `acks` keeps the delivered cursors not yet written, by one rule for every engine;
//! `tests` is the shared suite every engine passes.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;

mod acks;
mod embedded;
mod local;
mod logstore;
mod memory;
mod redis;
mod redis_connection;
mod segment;

/// What presence and the webhook outbox share with the Redis engine: its connection and
/// key prefix.
pub(crate) use redis::{connect as connect_redis, key_prefix};
pub(crate) use redis_connection::RedisConnection;
#[cfg(test)]
mod tests;

use local::LocalEngine;

/// How often every engine writes its pending acks (see `acks`) and looks for work to
/// clean up (the Redis engine also checks its health): a second bounds how far a crash
/// can set a delivered cursor back.
const TICK: Duration = Duration::from_secs(1);
/// The clean-up never runs more often than this, so a scan of all listeners costs
/// nothing however short the limits.
const MIN_CLEAN_UP_EVERY: Duration = Duration::from_millis(200);
/// The clean-up runs at least this often, so nothing outlives its limit by more than a
/// minute however long the limits.
const MAX_CLEAN_UP_EVERY: Duration = Duration::from_secs(60);

/// A position in the log. Positions start at 1 and grow by one per message; 0 means
/// "before everything". On Redis, a new epoch (the log lost its tail in a failover) makes
/// them jump past every position handed out before, and they stay below 2^53. The event
/// id a client sees is this number in decimal.
pub(crate) type Position = u64;

/// One stored message, shared by every stream that delivers it.
#[derive(Debug)]
pub(crate) struct Message {
    /// Where it stands in the log; its event id.
    pub pos: Position,
    /// The track it was published to.
    pub track: Arc<str>,
    /// The message as compact JSON text (no newline, so it fits one SSE `data:` line).
    pub json: Box<str>,
    /// When it was stored, in milliseconds since the Unix epoch (for retention).
    pub time_ms: u64,
    sse: OnceLock<Bytes>,
    json_event: OnceLock<Bytes>,
    ws: OnceLock<Bytes>,
}

impl Message {
    /// Makes a message; `json` must be compact JSON.
    pub(crate) fn new(pos: Position, track: Arc<str>, json: Box<str>, time_ms: u64) -> Self {
        Self {
            pos,
            track,
            json,
            time_ms,
            sse: OnceLock::new(),
            json_event: OnceLock::new(),
            ws: OnceLock::new(),
        }
    }

    /// The message as one JSON event, `{"id", "track", "message"}`: a WebSocket text
    /// frame, and an item of a long-poll answer. Built once and shared.
    pub(crate) fn json_event(&self) -> Bytes {
        self.json_event
            .get_or_init(|| {
                let mut event = self.frame_buffer(32);
                event.extend_from_slice(b"{\"id\":\"");
                push_decimal(&mut event, self.pos);
                event.extend_from_slice(b"\",\"track\":");
                push_json_string(&mut event, &self.track);
                event.extend_from_slice(b",\"message\":");
                event.extend_from_slice(self.json.as_bytes());
                event.push(b'}');
                Bytes::from(event)
            })
            .clone()
    }

    /// The message's WebSocket frame, built once and shared by every socket: a final,
    /// unmasked text frame (RFC 6455 §5.2) carrying [`Self::json_event`].
    pub(crate) fn ws_frame(&self) -> Bytes {
        self.ws
            .get_or_init(|| {
                let payload = self.json_event();
                let len = payload.len();
                let mut frame = Vec::with_capacity(len + 10);
                frame.push(0x81); // FIN + text
                if len < 126 {
                    frame.push(len as u8);
                } else if let Ok(len) = u16::try_from(len) {
                    frame.push(126);
                    frame.extend_from_slice(&len.to_be_bytes());
                } else {
                    frame.push(127);
                    frame.extend_from_slice(&(len as u64).to_be_bytes());
                }
                frame.extend_from_slice(&payload);
                Bytes::from(frame)
            })
            .clone()
    }

    /// The message's Server-Sent Events frame, built once and shared by every stream.
    pub(crate) fn sse_frame(&self) -> Bytes {
        self.sse
            .get_or_init(|| {
                let mut frame = self.frame_buffer(40);
                frame.extend_from_slice(b"id: ");
                push_decimal(&mut frame, self.pos);
                frame.extend_from_slice(b"\ndata: {\"track\":");
                push_json_string(&mut frame, &self.track);
                frame.extend_from_slice(b",\"message\":");
                frame.extend_from_slice(self.json.as_bytes());
                frame.extend_from_slice(b"}\n\n");
                Bytes::from(frame)
            })
            .clone()
    }
}

impl Message {
    /// An empty buffer with room for a frame of this message: `extra` bytes of framing,
    /// the id, the track (quoted, and escaped when it must be) and the JSON. One
    /// allocation per frame, built once per message and shared by every stream.
    fn frame_buffer(&self, extra: usize) -> Vec<u8> {
        Vec::with_capacity(extra + 20 + self.track.len() + 2 + self.json.len())
    }
}

/// `n` in decimal, without the formatting machinery (a frame is built per message).
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// `text` as a JSON string. Tracks are checked names (no control characters), so the
/// quotes alone nearly always do; anything to escape goes through serde_json.
fn push_json_string(out: &mut Vec<u8>, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, text).is_err() {
        // Writing a string into a Vec cannot fail; keep the frame valid regardless.
        out.extend_from_slice(b"\"\"");
    }
}

/// What a caller asks to publish: a checked track and a compact JSON message, each in
/// the allocation the stored [`Message`] keeps (nothing is copied on the way in).
#[derive(Debug, Clone)]
pub(crate) struct Update {
    /// The track, already checked by `names::check_track`.
    pub track: Arc<str>,
    /// The message as compact JSON text.
    pub json: Box<str>,
}

/// Longest `Idempotency-Key`, in bytes (the SPEC's 1 to 255 printable ASCII): room for
/// any UUID, hash or composite key a publisher makes, while a stored key stays small.
pub(crate) const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// The shortest time an `Idempotency-Key` is remembered, whatever the retention: a
/// publisher that retries after an outage (a night, a deploy) still must not publish
/// twice, even when the messages themselves were already trimmed (SPEC: 24 h).
pub(crate) const MIN_IDEMPOTENCY_KEEP: Duration = Duration::from_secs(24 * 3600);

/// A publisher's `Idempotency-Key`, with a digest of the updates it came with: an append
/// repeated with the key answers the first one's positions and stores nothing; the
/// same key with other updates is [`EngineError::KeyReused`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdempotencyKey {
    key: String,
    digest: String,
}

/// Why a text is not an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadIdempotencyKey(pub String);

impl IdempotencyKey {
    /// The key `key` for `updates`: 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] printable ASCII
    /// characters (space to `~`).
    pub(crate) fn new(key: &[u8], updates: &[Update]) -> Result<Self, BadIdempotencyKey> {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(BadIdempotencyKey(format!(
                "an Idempotency-Key is 1 to {MAX_IDEMPOTENCY_KEY_BYTES} characters, this one is {}",
                key.len()
            )));
        }
        let Ok(key) = std::str::from_utf8(key) else {
            return Err(BadIdempotencyKey(
                "an Idempotency-Key is printable ASCII (space to ~)".into(),
            ));
        };
        if let Some(bad) = key.chars().find(|c| !matches!(c, ' '..='~')) {
            return Err(BadIdempotencyKey(format!(
                "an Idempotency-Key is printable ASCII (space to ~), not {bad:?}"
            )));
        }
        Ok(Self {
            key: key.to_owned(),
            digest: digest(updates),
        })
    }

    /// The key as the publisher sent it.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// SHA-256 of the updates, in hex: what a repeat must match.
    pub(crate) fn digest(&self) -> &str {
        &self.digest
    }
}

/// SHA-256 (hex) of the updates, each track and message prefixed by its length so that
/// no two different lists of updates read as the same bytes. Every node and every
/// version computes the same digest: a Redis key written by one node is checked by
/// another.
fn digest(updates: &[Update]) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for update in updates {
        for part in [&*update.track, &*update.json] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Appended {
    /// The positions of the updates, in order.
    pub positions: Vec<Position>,
    /// Whether the append was a repeat of an earlier one with the same key: nothing was
    /// stored, and `positions` are the earlier ones.
    pub repeated: bool,
}

/// A listener's subscription to one track.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Subscription {
    /// The track.
    pub track: String,
    /// The log position when the subscription began: later messages are the listener's.
    pub since: Position,
}

/// A listener as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Listener {
    /// Its uid.
    pub uid: String,
    /// Its subscriptions, in the order they were made.
    pub tracks: Vec<Subscription>,
    /// How far the server has delivered to it.
    pub cursor: Position,
    /// When it was last connected, delivered to or seen with an open stream (ms since epoch).
    pub last_seen_ms: u64,
}

impl Listener {
    /// The names of its tracks.
    pub(crate) fn track_names(&self) -> Vec<String> {
        self.tracks.iter().map(|s| s.track.clone()).collect()
    }
}

/// A page of a listener's queue, read from one consistent snapshot.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    /// The listener's messages after the asked position, in log order, at most the limit.
    pub messages: Vec<Arc<Message>>,
    /// The listener's subscriptions in that snapshot.
    pub tracks: Vec<Subscription>,
    /// The last position in the log in that snapshot.
    pub head: Position,
    /// Every position up to this one has been deleted by retention (or, on Redis, is
    /// from before the log's epoch).
    pub trimmed_through: Position,
    /// Where the log's epoch began (Redis; 0 elsewhere): positions up to it are from a
    /// log that may have lost entries after them.
    pub epoch: Position,
}

impl Replay {
    /// Whether a client at `cursor` has lost something it can never get: a message of
    /// its tracks was deleted, or its cursor is from a log this store no longer has.
    pub(crate) fn is_reset(&self, cursor: Position) -> bool {
        cursor > self.head
            || self
                .tracks
                .iter()
                .any(|s| cursor.max(s.since) < self.trimmed_through)
    }

    /// Where a stream at `cursor` goes on after its reset: for a cursor from before the
    /// epoch, the epoch's start, so everything the new epoch keeps follows the reset
    /// (nothing acknowledged since the failover is skipped); for one that retention
    /// passed, the head (then only live messages, as the SPEC says).
    pub(crate) fn resume_after_reset(&self, cursor: Position) -> Position {
        if cursor < self.epoch && self.trimmed_through <= self.epoch && self.epoch <= self.head {
            self.epoch
        } else {
            self.head
        }
    }
}

/// A page of a track's subscribers, ordered by uid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Subscribers {
    /// How many listeners are subscribed to the track (all pages).
    pub count: u64,
    /// This page: each uid with when it was last seen (ms since the epoch).
    pub page: Vec<(String, u64)>,
}

/// A page of a track's history, read from one consistent snapshot.
#[derive(Debug, Default)]
pub(crate) struct History {
    /// The track's messages after the asked position, in log order, at most the limit.
    pub messages: Vec<Arc<Message>>,
    /// The last position in the log.
    pub head: Position,
    /// Every position up to this one has been deleted by retention.
    pub trimmed_through: Position,
}

impl History {
    /// Whether a reader that had everything up to `after` has missed messages the store
    /// no longer keeps (or names a position this log never had).
    pub(crate) fn is_reset(&self, after: Position) -> bool {
        after > self.head || after < self.trimmed_through
    }
}

/// A change the engine committed, reported to the [`Tail`] in commit order.
#[derive(Debug, Clone)]
pub(crate) enum Change {
    /// A message was stored.
    Appended(Arc<Message>),
    /// A listener was subscribed to a track.
    Connected {
        /// The listener.
        uid: Arc<str>,
        /// The track.
        track: Arc<str>,
    },
    /// A listener left a track, or (`track: None`) was forgotten.
    Disconnected {
        /// The listener.
        uid: Arc<str>,
        /// The track, or none when the whole listener is gone.
        track: Option<Arc<str>>,
    },
    /// Messages were committed that this node will never hear about (its reader fell
    /// behind the retention of a shared log): every open stream must catch up from the
    /// store by its cursor.
    Lost,
}

/// Receives every committed change, in commit order. The hub implements it.
pub(crate) trait Tail: Send + Sync + 'static {
    /// Called once per commit with its changes and how long the commit took; must not
    /// block.
    fn apply(&self, changes: &[Change], commit_took: Duration);
}

/// Counts for `/api/v1/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct StoreCounts {
    /// Listeners known to the store.
    pub listeners: u64,
    /// Tracks with at least one subscriber.
    pub tracks: u64,
    /// Messages kept in the log.
    pub messages: u64,
}

/// Limits the engine enforces by itself.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Messages older than this are deleted.
    pub retention: Duration,
    /// At most this many messages are kept; the oldest go first.
    pub max_stored_messages: u64,
    /// A listener not seen for this long is forgotten.
    pub listener_ttl: Duration,
    /// An `Idempotency-Key` is remembered this long: [`Limits::idempotency_keep_for`]
    /// the retention (shorter only in tests).
    pub idempotency_keep: Duration,
    /// How long the revocation a `disconnect` of a whole listener records is kept: the
    /// longest a listener token may live (`auth::REVOCATION_TTL`), so every token it
    /// revokes has expired by the time it is dropped.
    pub revocation_ttl: Duration,
}

impl Limits {
    /// How long to remember an `Idempotency-Key` under `retention`: as long as the
    /// messages it stored are kept, and never less than [`MIN_IDEMPOTENCY_KEEP`].
    pub(crate) fn idempotency_keep_for(retention: Duration) -> Duration {
        retention.max(MIN_IDEMPOTENCY_KEEP)
    }

    /// How often retention and expiry run: often enough to keep within a tenth of the
    /// shortest limit, within [`MIN_CLEAN_UP_EVERY`] and [`MAX_CLEAN_UP_EVERY`].
    pub(crate) fn clean_up_every(&self) -> Duration {
        (self
            .retention
            .min(self.listener_ttl)
            .min(self.idempotency_keep)
            / 10)
            .clamp(MIN_CLEAN_UP_EVERY, MAX_CLEAN_UP_EVERY)
    }

    /// At `now_ms`, messages stored before this time (ms since the epoch) are deleted.
    pub(crate) fn keep_messages_after(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.retention.as_millis() as u64)
    }

    /// At `now_ms`, listeners last seen before this time (ms since the epoch) are forgotten.
    pub(crate) fn forget_listeners_seen_before(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.listener_ttl.as_millis() as u64)
    }

    /// At `now_ms`, idempotency keys recorded before this time (ms since the epoch) are
    /// forgotten.
    pub(crate) fn forget_keys_before(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.idempotency_keep.as_millis() as u64)
    }
}

/// What can go wrong in an engine. None of it is the caller's fault but `KeyReused`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The storage failed (corrupt file, lost connection…).
    #[error("storage failed: {0}")]
    Storage(String),
    /// The disk is full: nothing can be written until space is freed.
    #[error("the disk is full: {0}")]
    Full(String),
    /// The store's file is damaged (bit rot, a torn copy): it names the file.
    #[error("{0}")]
    Corrupt(String),
    /// The engine is shutting down and takes no more work.
    #[error("the store is shutting down")]
    Closed,
    /// The `Idempotency-Key` came with other updates before: nothing was stored.
    #[error("the idempotency key was used for other updates")]
    KeyReused,
    /// Stored on the Redis primary, but fewer replicas than `--redis-min-replicas`
    /// acknowledged it in time: a failover could lose it. Says how many did.
    #[error("{0}")]
    NotReplicated(String),
}

/// Shortens `Result<T, EngineError>`.
pub(crate) type Result<T, E = EngineError> = std::result::Result<T, E>;

/// The store behind every node. See the module docs.
#[async_trait::async_trait]
pub(crate) trait Engine: Send + Sync + std::fmt::Debug + 'static {
    /// A short name for status pages: `memory`, `embedded`, `redis`.
    fn kind(&self) -> &'static str;

    /// Appends messages in one all-or-nothing step; returns their positions. When this
    /// returns, the messages are stored as durably as the engine promises. (The tests'
    /// shorthand for [`Engine::append_with_key`] without a key.)
    #[cfg(test)]
    async fn append(&self, updates: Vec<Update>) -> Result<Vec<Position>> {
        Ok(self.append_with_key(updates, None).await?.positions)
    }

    /// [`Engine::append`] once per `key`: the key is looked up and recorded in the
    /// same atomic step as the append, so a repeat — however many nodes, however
    /// concurrent — answers the first append's positions and stores nothing, while
    /// the key is kept ([`Limits::idempotency_keep`]). A repeat with other updates
    /// fails with [`EngineError::KeyReused`].
    async fn append_with_key(
        &self,
        updates: Vec<Update>,
        key: Option<IdempotencyKey>,
    ) -> Result<Appended>;

    /// Subscribes `uid` to `tracks` (creating the listener if new); returns its tracks.
    /// Subscribing again to a track it has is a no-op.
    async fn connect(&self, uid: &str, tracks: Vec<String>) -> Result<Vec<String>>;

    /// Unsubscribes `uid` from `track`, or forgets it when `track` is `None`. Returns
    /// the tracks left, or `None` when the listener is unknown.
    ///
    /// Forgetting a listener also records, in the same commit, a revocation at this
    /// time (kept for `Limits::revocation_ttl`, see [`Engine::revoked_at`]) — even for a
    /// listener already unknown, since a token with a `tracks` claim would otherwise
    /// re-create it. Expiry by `listener_ttl` revokes nothing.
    async fn disconnect(&self, uid: &str, track: Option<String>) -> Result<Option<Vec<String>>>;

    /// When `uid` was last forgotten by [`Engine::disconnect`] (ms since the Unix
    /// epoch), if that is less than `Limits::revocation_ttl` ago: listener tokens issued
    /// before it are revoked.
    async fn revoked_at(&self, uid: &str) -> Result<Option<u64>>;

    /// The listener, if known.
    async fn listener(&self, uid: &str) -> Result<Option<Listener>>;

    /// Up to `limit` of the listener's messages after `after`, with the log bounds.
    /// `None` when the listener is unknown.
    async fn replay(&self, uid: &str, after: Position, limit: usize) -> Result<Option<Replay>>;

    /// How many listeners `track` has, and up to `limit` of them with uids after
    /// `after` (`""` for the first page), ordered by uid.
    async fn subscribers(&self, track: &str, after: &str, limit: usize) -> Result<Subscribers>;

    /// Up to `limit` of `track`'s stored messages after `after`, with the log bounds.
    async fn history(&self, track: &str, after: Position, limit: usize) -> Result<History>;

    /// Records that `uid` was delivered everything up to `pos` (or was merely seen, with
    /// a lower `pos`). Cheap: written to the store lazily, in the next group commit.
    fn ack(&self, uid: &str, pos: Position);

    /// Counts of what is stored.
    async fn counts(&self) -> Result<StoreCounts>;

    /// Whether the store answered its last calls (for `/healthz`).
    fn healthy(&self) -> bool {
        true
    }

    /// Why `/healthz` should answer 503, when it should: the store does not answer, or
    /// (Redis) this node has stopped following the log.
    fn failing(&self) -> Option<String> {
        (!self.healthy()).then(|| {
            format!(
                "the {} store is failing (a write or a read did not go through; the log says why)",
                self.kind()
            )
        })
    }

    /// Writes everything pending and stops taking work.
    async fn close(&self);

    /// Its acks not yet written, for the shared suite to hold a flush.
    #[cfg(test)]
    #[allow(private_interfaces, reason = "only the crate's own tests call it")]
    fn pending_acks(&self) -> &acks::PendingAcks;
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Opens the in-memory engine.
pub(crate) fn open_memory(limits: Limits, tail: Arc<dyn Tail>) -> Arc<dyn Engine> {
    Arc::new(LocalEngine::start(
        memory::MemoryStorage::default(),
        "memory",
        limits,
        tail,
    ))
}

/// Connects to the Redis engine at `url`, its keys under `prefix`; with `min_replicas`
/// > 0 an append waits for that many replicas (`--redis-min-replicas`).
pub(crate) async fn open_redis(
    url: &str,
    prefix: &str,
    min_replicas: u32,
    limits: Limits,
    tail: Arc<dyn Tail>,
) -> Result<Arc<dyn Engine>> {
    Ok(Arc::new(
        redis::RedisEngine::open(url, prefix, min_replicas, limits, tail).await?,
    ))
}

/// Checks the embedded store in `dir` without changing it (a copy of the redb file is
/// checked, the log is only read), or repairs it in place when `repair`: `Ok(true)` when it was sound, `Ok(false)` when it
/// was repaired. For `dolores check` and `dolores repair`, with the server stopped.
pub(crate) fn check_embedded(dir: &std::path::Path, repair: bool) -> Result<bool> {
    logstore::check(dir, repair)
}

/// Opens the embedded store in `dir` (creating it if missing).
pub(crate) fn open_embedded(
    dir: &std::path::Path,
    limits: Limits,
    tail: Arc<dyn Tail>,
) -> Result<Arc<dyn Engine>> {
    let storage = logstore::LogStorage::open(dir)?;
    Ok(Arc::new(LocalEngine::start(
        storage, "embedded", limits, tail,
    )))
}

#[cfg(test)]
mod frame_tests {
    use super::Message;

    proptest::proptest! {
        /// The frames built by hand are exactly what the formatting machinery makes:
        /// any position, any track (quotes, backslashes, any Unicode), any JSON.
        #[test]
        fn frames_are_the_formatted_ones(pos in proptest::num::u64::ANY, track in "\\PC{1,12}|[a-z\"\\\\]{1,6}", n in proptest::num::i64::ANY) {
            let json = serde_json::json!({"n": n, "s": track}).to_string();
            let message = Message::new(pos, track.as_str().into(), json.clone().into(), 0);
            let quoted = serde_json::to_string(&track).unwrap();
            let sse = format!("id: {pos}\ndata: {{\"track\":{quoted},\"message\":{json}}}\n\n");
            proptest::prop_assert_eq!(&message.sse_frame()[..], sse.as_bytes());
            let event = format!("{{\"id\":\"{pos}\",\"track\":{quoted},\"message\":{json}}}");
            proptest::prop_assert_eq!(&message.json_event()[..], event.as_bytes());
        }
    }
}
