//! The shared engine suite: every engine must pass every test here. Each test is a
//! function over an engine factory; the macro at the bottom runs it on each engine.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// Records what the engine reports to its tail.
#[derive(Default)]
struct RecordingTail(Mutex<Vec<Change>>);

impl Tail for RecordingTail {
    fn apply(&self, changes: &[Change], _took: Duration) {
        self.0.lock().expect("lock").extend(changes.iter().cloned());
    }
}

impl RecordingTail {
    fn appended(&self) -> Vec<Position> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|c| match c {
                Change::Appended(m) => Some(m.pos),
                _ => None,
            })
            .collect()
    }
}

/// Makes engines of one kind; `reopen` opens the same store again, when it persists.
trait Factory {
    fn open(&self, limits: Limits, tail: Arc<dyn Tail>) -> Arc<dyn Engine>;
    fn persists(&self) -> bool;
    /// Makes the closed store look like one written before the track indexes (the
    /// subscriber index; on Redis the message indexes too).
    fn forget_track_indexes(&self) {}
}

struct Memory;
impl Factory for Memory {
    fn open(&self, limits: Limits, tail: Arc<dyn Tail>) -> Arc<dyn Engine> {
        open_memory(limits, tail)
    }
    fn persists(&self) -> bool {
        false
    }
}

struct Embedded(tempfile::TempDir);
impl Factory for Embedded {
    /// Waits (at most 5 s) for an engine just dropped to let go of the file: its writer
    /// thread holds it until it sees its channel close, where a killed process's would
    /// be gone at once.
    fn open(&self, limits: Limits, tail: Arc<dyn Tail>) -> Arc<dyn Engine> {
        let started = std::time::Instant::now();
        loop {
            match open_embedded(self.0.path(), limits.clone(), tail.clone()) {
                Ok(engine) => return engine,
                Err(e) if started.elapsed() < Duration::from_secs(5) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("open embedded: {e}"),
            }
        }
    }
    fn persists(&self) -> bool {
        true
    }
    fn forget_track_indexes(&self) {
        embedded::forget_subscribed_index(self.0.path()).expect("forget the index");
    }
}

/// A Redis engine under a key prefix of its own, on the Redis at `DOLORES_TEST_REDIS`
/// (default `redis://127.0.0.1:6379/0`; `scripts/test` starts one if none runs).
struct RedisFactory(String);

impl RedisFactory {
    fn new() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(format!(
            "dolores-test-{}-{n}-{}",
            std::process::id(),
            now_ms()
        ))
    }

    fn url() -> String {
        std::env::var("DOLORES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
    }
}

impl Factory for RedisFactory {
    fn open(&self, limits: Limits, tail: Arc<dyn Tail>) -> Arc<dyn Engine> {
        let url = Self::url();
        let prefix = self.0.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(open_redis(&url, &prefix, 0, limits, tail))
                .expect("open redis engine (is redis-server running?)")
        })
    }
    fn persists(&self) -> bool {
        true
    }
    fn forget_track_indexes(&self) {
        let prefix = self.0.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let client = ::redis::Client::open(Self::url()).expect("redis url");
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("redis");
                for pattern in ["t:*", "ts:*", "tidx", "index"] {
                    let keys: Vec<String> = ::redis::cmd("KEYS")
                        .arg(format!("{prefix}:{pattern}"))
                        .query_async(&mut conn)
                        .await
                        .expect("KEYS");
                    if !keys.is_empty() {
                        let _: () = ::redis::cmd("DEL")
                            .arg(keys)
                            .query_async(&mut conn)
                            .await
                            .expect("DEL");
                    }
                }
            });
        });
    }
}

/// Waits (bounded) until the tail has heard exactly `expected` appends, in order: a
/// Redis node hears its own appends through its tail reader, a moment later.
async fn tail_hears(tail: &RecordingTail, expected: &[Position]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tail.appended() != expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tail.appended(), expected);
}

fn limits() -> Limits {
    Limits {
        retention: Duration::from_secs(3600),
        max_stored_messages: 1_000_000,
        listener_ttl: Duration::from_secs(3600),
        idempotency_keep: Limits::idempotency_keep_for(Duration::from_secs(3600)),
        revocation_ttl: Duration::from_secs(3600),
    }
}

fn update(track: &str, message: &str) -> Update {
    Update {
        track: track.into(),
        json: serde_json::to_string(message).expect("json").into(),
    }
}

async fn queue(engine: &Arc<dyn Engine>, uid: &str, after: Position) -> Vec<(Position, String)> {
    engine
        .replay(uid, after, 10_000)
        .await
        .expect("replay")
        .expect("known listener")
        .messages
        .iter()
        .map(|m| (m.pos, m.json.to_string()))
        .collect()
}

async fn positions_grow_and_the_tail_hears_them_in_order(f: impl Factory) {
    let tail = Arc::new(RecordingTail::default());
    let engine = f.open(limits(), tail.clone());
    let a = engine
        .append(vec![update(":a", "1")])
        .await
        .expect("append");
    let b = engine
        .append(vec![update(":a", "2"), update(":b", "3")])
        .await
        .expect("append");
    assert_eq!(a, vec![1]);
    assert_eq!(b, vec![2, 3]);
    tail_hears(&tail, &[1, 2, 3]).await;
    engine.close().await;
}

async fn a_subscription_starts_at_connect(f: impl Factory) {
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    engine
        .append(vec![update(":a", "before")])
        .await
        .expect("append");
    let tracks = engine
        .connect("listener-1", vec![":a".into()])
        .await
        .expect("connect");
    assert_eq!(tracks, vec![":a"]);
    engine
        .append(vec![update(":a", "after")])
        .await
        .expect("append");
    let listener = engine
        .listener("listener-1")
        .await
        .expect("read")
        .expect("known");
    assert_eq!(
        listener.cursor, 1,
        "a new listener's cursor is the head at connect"
    );
    assert_eq!(
        queue(&engine, "listener-1", listener.cursor).await,
        vec![(2, "\"after\"".into())]
    );
    // Connecting again is a no-op and does not move the subscription start.
    engine
        .connect("listener-1", vec![":a".into()])
        .await
        .expect("connect");
    assert_eq!(queue(&engine, "listener-1", 0).await.len(), 1);
    engine.close().await;
}

async fn a_queue_merges_tracks_in_log_order(f: impl Factory) {
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    engine
        .connect("listener-1", vec![":a".into(), ":b".into()])
        .await
        .expect("connect");
    let mut all = Vec::new();
    for i in 0..30 {
        let track = [":a", ":b", ":c"][i % 3];
        let pos = engine
            .append(vec![update(track, &i.to_string())])
            .await
            .expect("append")[0];
        if track != ":c" {
            all.push(pos);
        }
    }
    let got: Vec<Position> = queue(&engine, "listener-1", 0)
        .await
        .iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(got, all);
    let page = engine
        .replay("listener-1", 0, 5)
        .await
        .expect("replay")
        .expect("known");
    assert_eq!(
        page.messages.iter().map(|m| m.pos).collect::<Vec<_>>(),
        all[..5]
    );
    let after: Vec<Position> = queue(&engine, "listener-1", all[9])
        .await
        .iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(after, all[10..]);
    engine.close().await;
}

async fn disconnect_leaves_a_track_or_forgets_the_listener(f: impl Factory) {
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    engine
        .connect("listener-1", vec![":a".into(), ":b".into()])
        .await
        .expect("connect");
    let left = engine
        .disconnect("listener-1", Some(":a".into()))
        .await
        .expect("disconnect");
    assert_eq!(left, Some(vec![":b".to_owned()]));
    assert_eq!(engine.counts().await.expect("counts").tracks, 1);
    assert_eq!(
        engine.disconnect("listener-1", None).await.expect("forget"),
        Some(vec![])
    );
    assert!(engine.listener("listener-1").await.expect("read").is_none());
    assert!(
        engine
            .replay("listener-1", 0, 10)
            .await
            .expect("replay")
            .is_none()
    );
    assert_eq!(
        engine.disconnect("listener-1", None).await.expect("again"),
        None
    );
    assert_eq!(engine.counts().await.expect("counts").listeners, 0);
    engine.close().await;
}

async fn acks_move_the_cursor_and_are_written(f: impl Factory) {
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    engine
        .connect("listener-1", vec![":a".into()])
        .await
        .expect("connect");
    engine
        .append(vec![update(":a", "1"), update(":a", "2")])
        .await
        .expect("append");
    engine.ack("listener-1", 2);
    engine.ack("listener-1", 1); // never backwards
    assert_eq!(
        engine
            .listener("listener-1")
            .await
            .expect("read")
            .expect("known")
            .cursor,
        2
    );
    engine.close().await;
    drop(engine);
    if f.persists() {
        let engine = f.open(limits(), Arc::new(RecordingTail::default()));
        let listener = engine
            .listener("listener-1")
            .await
            .expect("read")
            .expect("known");
        assert_eq!(listener.cursor, 2, "close flushes acks");
        engine.close().await;
    }
}

/// A stream opened without a cursor starts at the listener's cursor. While a flush is
/// writing the pending acks, the store still holds the older cursor: the read must
/// still see the newest one, or the stream sends the delivered messages again.
async fn a_stream_opened_while_acks_are_flushed_sends_no_duplicate(f: impl Factory) {
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    engine
        .connect("listener-1", vec![":a".into()])
        .await
        .expect("connect");
    engine
        .append(vec![update(":a", "1"), update(":a", "2")])
        .await
        .expect("append");
    let held = engine.pending_acks().hold_next_flush();
    engine.ack("listener-1", 2);
    // The next tick's flush takes its snapshot and stops before writing it.
    held.until_holding(Duration::from_secs(10)).await;
    // What `transport::open` does for a stream without a cursor.
    let cursor = engine
        .listener("listener-1")
        .await
        .expect("read")
        .expect("known")
        .cursor;
    assert_eq!(cursor, 2, "the cursor being flushed counts");
    assert_eq!(
        queue(&engine, "listener-1", cursor).await,
        vec![],
        "no message is sent again"
    );
    drop(held);
    // Once written, the ack leaves the pending ones and the store has it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while engine.pending_acks().get("listener-1").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flush never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        engine
            .listener("listener-1")
            .await
            .expect("read")
            .expect("known")
            .cursor,
        2
    );
    engine.close().await;
}

async fn the_store_keeps_at_most_max_stored_messages(f: impl Factory) {
    let engine = f.open(
        Limits {
            max_stored_messages: 5,
            ..limits()
        },
        Arc::new(RecordingTail::default()),
    );
    engine
        .connect("listener-1", vec![":a".into()])
        .await
        .expect("connect");
    for i in 0..12 {
        engine
            .append(vec![update(":a", &i.to_string())])
            .await
            .expect("append");
    }
    assert_eq!(engine.counts().await.expect("counts").messages, 5);
    let page = engine
        .replay("listener-1", 0, 100)
        .await
        .expect("replay")
        .expect("known");
    assert_eq!(
        page.messages.iter().map(|m| m.pos).collect::<Vec<_>>(),
        vec![8, 9, 10, 11, 12]
    );
    assert_eq!(page.trimmed_through, 7);
    assert!(page.is_reset(0), "a cursor before the trim lost messages");
    assert!(!page.is_reset(7), "a cursor at the trim lost nothing");
    assert!(
        page.is_reset(13),
        "a cursor past the head is from another log"
    );
    engine.close().await;
}

async fn retention_and_listener_ttl_clean_up(f: impl Factory) {
    let engine = f.open(
        Limits {
            retention: Duration::from_millis(300),
            listener_ttl: Duration::from_millis(300),
            ..limits()
        },
        Arc::new(RecordingTail::default()),
    );
    engine
        .connect("listener-1", vec![":a".into()])
        .await
        .expect("connect");
    engine
        .append(vec![update(":a", "old")])
        .await
        .expect("append");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let counts = engine.counts().await.expect("counts");
        if counts.messages == 0 && counts.listeners == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not cleaned up: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Positions never go back after a clean-up.
    let next = engine
        .append(vec![update(":a", "new")])
        .await
        .expect("append");
    assert_eq!(next, vec![2]);
    engine.close().await;
}

async fn concurrent_appends_are_each_stored_once(f: impl Factory) {
    let tail = Arc::new(RecordingTail::default());
    let engine = f.open(limits(), tail.clone());
    let mut tasks = Vec::new();
    for p in 0..8 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..50 {
                ids.extend(
                    engine
                        .append(vec![update(":a", &format!("{p}-{i}"))])
                        .await
                        .expect("append"),
                );
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        let mine = task.await.expect("task");
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "one publisher's ids grow"
        );
        ids.extend(mine);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=400).collect::<Vec<_>>());
    tail_hears(&tail, &(1..=400).collect::<Vec<_>>()).await;
    engine.close().await;
}

async fn forgetting_a_listener_revokes_its_tokens(f: impl Factory) {
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    engine
        .connect("listener-1", vec![":a".into(), ":b".into()])
        .await
        .expect("connect");
    assert_eq!(engine.revoked_at("listener-1").await.expect("read"), None);
    engine
        .disconnect("listener-1", Some(":a".into()))
        .await
        .expect("disconnect");
    assert_eq!(
        engine.revoked_at("listener-1").await.expect("read"),
        None,
        "leaving one track revokes nothing"
    );
    let before = now_ms();
    engine
        .disconnect("listener-1", None)
        .await
        .expect("disconnect");
    let after = now_ms();
    let at = engine
        .revoked_at("listener-1")
        .await
        .expect("read")
        .expect("revoked");
    assert!(before <= at && at <= after, "{before} <= {at} <= {after}");
    // Connected again: the revocation stays (it is about tokens issued before it).
    engine
        .connect("listener-1", vec![":a".into()])
        .await
        .expect("connect");
    assert_eq!(
        engine.revoked_at("listener-1").await.expect("read"),
        Some(at)
    );
    // A listener already unknown is revoked too: its token could re-create it.
    assert_eq!(
        engine
            .disconnect("unknown-1", None)
            .await
            .expect("disconnect"),
        None
    );
    assert!(
        engine
            .revoked_at("unknown-1")
            .await
            .expect("read")
            .is_some()
    );
    engine.close().await;
}

async fn revocations_expire_and_expiry_revokes_nothing(f: impl Factory) {
    let engine = f.open(
        Limits {
            listener_ttl: Duration::from_millis(300),
            revocation_ttl: Duration::from_millis(300),
            ..limits()
        },
        Arc::new(RecordingTail::default()),
    );
    engine
        .connect("listener-1", vec![":a".into()])
        .await
        .expect("connect");
    engine
        .connect("listener-2", vec![":a".into()])
        .await
        .expect("connect");
    engine
        .disconnect("listener-1", None)
        .await
        .expect("disconnect");
    assert!(
        engine
            .revoked_at("listener-1")
            .await
            .expect("read")
            .is_some()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let revoked = engine.revoked_at("listener-1").await.expect("read");
        let expired = engine.listener("listener-2").await.expect("read").is_none();
        if revoked.is_none() && expired {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "revocation {revoked:?}, listener-2 expired: {expired}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        engine.revoked_at("listener-2").await.expect("read"),
        None,
        "a listener forgotten by expiry is not revoked"
    );
    engine.close().await;
}

async fn a_closed_engine_refuses_work(f: impl Factory) {
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    engine.close().await;
    assert!(matches!(
        engine.append(vec![update(":a", "x")]).await,
        Err(EngineError::Closed)
    ));
}

fn key(key: &str, updates: &[Update]) -> Option<IdempotencyKey> {
    Some(IdempotencyKey::new(key.as_bytes(), updates).expect("a valid key"))
}

/// Appends `updates` under `key` (a key of its own per test: Redis keys are shared).
async fn append_keyed(engine: &Arc<dyn Engine>, k: &str, updates: Vec<Update>) -> Appended {
    let key = key(k, &updates);
    engine
        .append_with_key(updates, key)
        .await
        .expect("append with a key")
}

async fn a_repeated_key_answers_the_first_positions_and_stores_nothing(f: impl Factory) {
    let tail = Arc::new(RecordingTail::default());
    let engine = f.open(limits(), tail.clone());
    let batch = || vec![update(":a", "1"), update(":b", "2")];
    let first = append_keyed(&engine, "key-1", batch()).await;
    assert_eq!(first.positions, vec![1, 2]);
    assert!(!first.repeated);
    let again = append_keyed(&engine, "key-1", batch()).await;
    assert_eq!(again.positions, vec![1, 2]);
    assert!(again.repeated, "the repeat says so");
    // The same key with other updates stores nothing and says why.
    let other = vec![update(":a", "something else")];
    assert!(matches!(
        engine
            .append_with_key(other.clone(), key("key-1", &other))
            .await,
        Err(EngineError::KeyReused)
    ));
    // Another key, or none, appends as usual.
    assert_eq!(
        append_keyed(&engine, "key-2", batch()).await.positions,
        vec![3, 4]
    );
    assert_eq!(engine.append(batch()).await.expect("append"), vec![5, 6]);
    tail_hears(&tail, &[1, 2, 3, 4, 5, 6]).await;
    assert_eq!(engine.counts().await.expect("counts").messages, 6);
    engine.close().await;
}

async fn one_key_sent_concurrently_stores_once(f: impl Factory) {
    let tail = Arc::new(RecordingTail::default());
    let engine = f.open(limits(), tail.clone());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            append_keyed(&engine, "same-key", vec![update(":a", "once")]).await
        }));
    }
    let mut stored = 0;
    for task in tasks {
        let appended = task.await.expect("task");
        assert_eq!(appended.positions, vec![1]);
        stored += usize::from(!appended.repeated);
    }
    assert_eq!(stored, 1, "exactly one of them stored the message");
    tail_hears(&tail, &[1]).await;
    engine.close().await;
}

async fn a_key_outlives_its_trimmed_messages(f: impl Factory) {
    let engine = f.open(
        Limits {
            max_stored_messages: 1,
            ..limits()
        },
        Arc::new(RecordingTail::default()),
    );
    let first = append_keyed(&engine, "key-1", vec![update(":a", "1")]).await;
    engine
        .append(vec![update(":a", "2")])
        .await
        .expect("append");
    assert_eq!(engine.counts().await.expect("counts").messages, 1);
    let again = append_keyed(&engine, "key-1", vec![update(":a", "1")]).await;
    assert_eq!(again.positions, first.positions);
    assert!(
        again.repeated,
        "trimmed, the message is still not stored twice"
    );
    engine.close().await;
}

async fn an_idempotency_key_expires_after_its_keep_time(f: impl Factory) {
    let engine = f.open(
        Limits {
            idempotency_keep: Duration::from_millis(300),
            ..limits()
        },
        Arc::new(RecordingTail::default()),
    );
    let first = append_keyed(&engine, "key-1", vec![update(":a", "1")]).await;
    assert_eq!(first.positions, vec![1]);
    // Repeats store nothing until the key is forgotten; then it is a new append.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again = append_keyed(&engine, "key-1", vec![update(":a", "1")]).await;
        if !again.repeated {
            assert_eq!(again.positions, vec![2]);
            break;
        }
        assert_eq!(again.positions, vec![1]);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine.close().await;
}

/// For the engines that keep a store (embedded, Redis: `persistent_engine_suite!`); the
/// memory engine's opposite is [`a_memory_engine_opened_again_starts_empty`].
async fn everything_acknowledged_survives_a_reopen(f: impl Factory) {
    assert!(f.persists(), "only for engines that keep a store");
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    engine
        .connect("listener-1", vec![":a".into()])
        .await
        .expect("connect");
    engine
        .append(vec![update(":a", "1"), update(":a", "2")])
        .await
        .expect("append");
    engine
        .disconnect("revoked-1", None)
        .await
        .expect("disconnect");
    // No close: as if killed. Commits are durable when they answer.
    drop(engine);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    assert_eq!(queue(&engine, "listener-1", 0).await.len(), 2);
    assert!(
        engine
            .revoked_at("revoked-1")
            .await
            .expect("read")
            .is_some(),
        "a revocation is kept with the store"
    );
    assert_eq!(
        engine
            .append(vec![update(":a", "3")])
            .await
            .expect("append"),
        vec![3]
    );
    engine.close().await;
}

async fn a_track_lists_its_subscribers_by_uid_in_pages(f: impl Factory) {
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    for uid in ["listener-c", "listener-a", "listener-d", "listener-b"] {
        engine
            .connect(uid, vec!["rooms/1".into(), ":other".into()])
            .await
            .expect("connect");
    }
    engine
        .connect("listener-e", vec![":other".into()])
        .await
        .expect("connect");
    let uids = |s: &Subscribers| s.page.iter().map(|(u, _)| u.clone()).collect::<Vec<_>>();
    let first = engine.subscribers("rooms/1", "", 3).await.expect("page");
    assert_eq!(first.count, 4);
    assert_eq!(uids(&first), ["listener-a", "listener-b", "listener-c"]);
    assert!(
        first.page.iter().all(|(_, seen)| *seen > 0),
        "last seen is known"
    );
    let second = engine
        .subscribers("rooms/1", "listener-c", 3)
        .await
        .expect("page");
    assert_eq!(uids(&second), ["listener-d"]);
    engine
        .disconnect("listener-b", Some("rooms/1".into()))
        .await
        .expect("disconnect");
    engine.disconnect("listener-d", None).await.expect("forget");
    let after = engine.subscribers("rooms/1", "", 10).await.expect("page");
    assert_eq!(after.count, 2);
    assert_eq!(uids(&after), ["listener-a", "listener-c"]);
    let unknown = engine.subscribers("nobody", "", 10).await.expect("page");
    assert_eq!(unknown, Subscribers::default());
    engine.close().await;
}

async fn a_track_history_pages_through_what_is_kept(f: impl Factory) {
    let engine = f.open(
        Limits {
            max_stored_messages: 6,
            ..limits()
        },
        Arc::new(RecordingTail::default()),
    );
    for i in 0..5 {
        engine
            .append(vec![
                update(":a", &format!("a{i}")),
                update(":b", &format!("b{i}")),
            ])
            .await
            .expect("append");
    }
    // Positions 1..=10, :a odd, :b even; positions 1..=4 were trimmed.
    let json = |h: &History| {
        h.messages
            .iter()
            .map(|m| (m.pos, m.json.to_string()))
            .collect::<Vec<_>>()
    };
    let all = engine.history(":a", 0, 100).await.expect("history");
    assert_eq!(
        json(&all),
        [
            (5, "\"a2\"".into()),
            (7, "\"a3\"".into()),
            (9, "\"a4\"".into())
        ]
    );
    assert!(all.messages.iter().all(|m| &*m.track == ":a"));
    assert_eq!((all.head, all.trimmed_through), (10, 4));
    assert!(all.is_reset(0) && all.is_reset(3) && all.is_reset(11));
    assert!(!all.is_reset(4) && !all.is_reset(10));
    let page = engine.history(":a", 5, 1).await.expect("history");
    assert_eq!(json(&page), [(7, "\"a3\"".into())]);
    assert!(
        engine
            .history("none", 0, 10)
            .await
            .expect("history")
            .messages
            .is_empty()
    );
    engine.close().await;
}

async fn replay_reads_only_the_listeners_tracks(f: impl Factory) {
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    engine
        .connect("listener-1", vec![":a".into(), ":c".into()])
        .await
        .expect("connect");
    let mut updates = Vec::new();
    for i in 0..1500 {
        // Mostly a track the listener does not have: a replay must still find its own.
        let track = match i % 500 {
            0 => ":a",
            250 => ":c",
            _ => ":b",
        };
        updates.push(update(track, &i.to_string()));
        if updates.len() == 500 {
            engine
                .append(std::mem::take(&mut updates))
                .await
                .expect("append");
        }
    }
    let page = engine
        .replay("listener-1", 0, 4)
        .await
        .expect("replay")
        .expect("known");
    assert_eq!(
        page.messages.iter().map(|m| m.pos).collect::<Vec<_>>(),
        [1, 251, 501, 751]
    );
    assert_eq!(queue(&engine, "listener-1", 751).await.len(), 2);
    engine.close().await;
}

macro_rules! engine_suite {
    ($($name:ident),* $(,)?) => {
        mod redis_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::RedisFactory::new()).await;
                }
            )*
        }
        mod memory_engine {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Memory).await;
                }
            )*
        }
        mod embedded_engine {
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    super::$name(super::Embedded(dir)).await;
                }
            )*
        }
    };
}

engine_suite!(
    positions_grow_and_the_tail_hears_them_in_order,
    a_subscription_starts_at_connect,
    a_queue_merges_tracks_in_log_order,
    disconnect_leaves_a_track_or_forgets_the_listener,
    acks_move_the_cursor_and_are_written,
    a_stream_opened_while_acks_are_flushed_sends_no_duplicate,
    the_store_keeps_at_most_max_stored_messages,
    retention_and_listener_ttl_clean_up,
    forgetting_a_listener_revokes_its_tokens,
    revocations_expire_and_expiry_revokes_nothing,
    concurrent_appends_are_each_stored_once,
    a_closed_engine_refuses_work,
    a_track_lists_its_subscribers_by_uid_in_pages,
    a_track_history_pages_through_what_is_kept,
    replay_reads_only_the_listeners_tracks,
    a_repeated_key_answers_the_first_positions_and_stores_nothing,
    one_key_sent_concurrently_stores_once,
    a_key_outlives_its_trimmed_messages,
    an_idempotency_key_expires_after_its_keep_time,
);

/// For the engines that keep a store: one written before the track indexes gets them
/// as it opens.
async fn a_store_from_before_the_track_indexes_gets_them(f: impl Factory) {
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    for uid in ["listener-b", "listener-a"] {
        engine
            .connect(uid, vec![":a".into(), ":b".into()])
            .await
            .expect("connect");
    }
    engine
        .append(vec![
            update(":a", "1"),
            update(":b", "2"),
            update(":a", "3"),
        ])
        .await
        .expect("append");
    engine.close().await;
    drop(engine);
    f.forget_track_indexes();
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    let subscribers = engine.subscribers(":a", "", 10).await.expect("subscribers");
    let uids: Vec<&str> = subscribers.page.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(
        (subscribers.count, uids),
        (2, vec!["listener-a", "listener-b"])
    );
    let history = engine.history(":a", 0, 10).await.expect("history");
    assert_eq!(
        history.messages.iter().map(|m| m.pos).collect::<Vec<_>>(),
        [1, 3]
    );
    assert_eq!(queue(&engine, "listener-a", 0).await.len(), 3);
    engine.close().await;
}

/// The tests of a store that outlives its engine: embedded and Redis only.
macro_rules! persistent_engine_suite {
    ($($name:ident),* $(,)?) => {
        mod redis_engine_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::RedisFactory::new()).await;
                }
            )*
        }
        mod embedded_engine_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    super::$name(super::Embedded(dir)).await;
                }
            )*
        }
    };
}

/// An idempotency key is kept with the store: a repeat after a reopen stores nothing.
async fn an_idempotency_key_survives_a_reopen(f: impl Factory) {
    assert!(f.persists(), "only for engines that keep a store");
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    let first = append_keyed(&engine, "key-1", vec![update(":a", "1")]).await;
    // Closed, not dropped: a crash is the e2e tests' (kill -9); here the point is that
    // the key is in the store, and a dropped writer may still hold the file a moment.
    engine.close().await;
    drop(engine);
    let engine = f.open(limits(), Arc::new(RecordingTail::default()));
    let again = append_keyed(&engine, "key-1", vec![update(":a", "1")]).await;
    assert_eq!(again.positions, first.positions);
    assert!(again.repeated);
    assert_eq!(engine.counts().await.expect("counts").messages, 1);
    engine.close().await;
}

#[test]
fn an_idempotency_key_is_1_to_255_printable_ascii() {
    let updates = [update(":a", "1")];
    for good in ["k", " spaced ~key ", &"x".repeat(255)] {
        assert!(
            IdempotencyKey::new(good.as_bytes(), &updates).is_ok(),
            "{good:?}"
        );
    }
    for bad in [
        &b""[..],
        &[b'x'; 256],
        b"tab\there",
        b"new\nline",
        "é".as_bytes(),
        b"\x7f",
    ] {
        assert!(IdempotencyKey::new(bad, &updates).is_err(), "{bad:?}");
    }
}

#[test]
fn the_digest_tells_apart_updates_that_concatenate_alike() {
    let digest = |updates: &[Update]| {
        IdempotencyKey::new(b"k", updates)
            .expect("key")
            .digest()
            .to_owned()
    };
    let one = digest(&[update(":ab", "c")]);
    assert_eq!(
        one,
        digest(&[update(":ab", "c")]),
        "the same updates, the same digest"
    );
    assert_ne!(one, digest(&[update(":a", "bc")]));
    assert_ne!(
        digest(&[update(":a", "1"), update(":a", "2")]),
        digest(&[update(":a", "2"), update(":a", "1")]),
        "order counts"
    );
    assert_eq!(one.len(), 64, "SHA-256 in hex");
}

persistent_engine_suite!(
    everything_acknowledged_survives_a_reopen,
    an_idempotency_key_survives_a_reopen,
    a_store_from_before_the_track_indexes_gets_them,
);

/// `--memory` keeps nothing: a new engine knows no listener and starts the log again
/// (what the README promises: queues lost on restart).
#[tokio::test]
async fn a_memory_engine_opened_again_starts_empty() {
    let engine = Memory.open(limits(), Arc::new(RecordingTail::default()));
    engine
        .connect("listener-1", vec![":a".into()])
        .await
        .expect("connect");
    engine
        .append(vec![update(":a", "1"), update(":a", "2")])
        .await
        .expect("append");
    assert_eq!(queue(&engine, "listener-1", 0).await.len(), 2);
    drop(engine);
    let engine = Memory.open(limits(), Arc::new(RecordingTail::default()));
    assert!(
        engine
            .listener("listener-1")
            .await
            .expect("lookup")
            .is_none(),
        "a new memory engine knows no listener"
    );
    assert!(
        engine
            .replay("listener-1", 0, 10)
            .await
            .expect("replay")
            .is_none()
    );
    assert_eq!(
        engine
            .append(vec![update(":a", "3")])
            .await
            .expect("append"),
        vec![1]
    );
    engine.close().await;
}
