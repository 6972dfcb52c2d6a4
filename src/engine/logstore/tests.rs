//! The segment log's own tests: torn writes, damage, retention by whole segments, and
//! the move from a store from before the log. (The shared suite in `tests` runs
//! against it too, as the embedded engine.)

use std::time::Duration;

use super::*;
use crate::engine::embedded;
use crate::engine::local::LocalEngine;
use crate::engine::{Change, Engine, IdempotencyKey, Limits, Tail, Update, now_ms};

struct NoTail;

impl Tail for NoTail {
    fn apply(&self, _changes: &[Change], _took: Duration) {}
}

fn limits(max_stored_messages: u64) -> Limits {
    Limits {
        retention: Duration::from_secs(3600),
        max_stored_messages,
        listener_ttl: Duration::from_secs(3600),
        idempotency_keep: Duration::from_secs(24 * 3600),
        revocation_ttl: Duration::from_secs(3600),
    }
}

fn open(dir: &Path, segment_bytes: u64, max_stored_messages: u64) -> Arc<dyn Engine> {
    let storage = LogStorage::open_with(dir, segment_bytes).expect("open the store");
    Arc::new(LocalEngine::start(
        storage,
        "embedded",
        limits(max_stored_messages),
        Arc::new(NoTail),
    ))
}

async fn close(engine: Arc<dyn Engine>) {
    engine.close().await;
    drop(engine);
}

fn update(track: &str, n: u64) -> Update {
    Update {
        track: track.into(),
        json: format!("{{\"n\":{n}}}").into(),
    }
}

async fn positions(engine: &Arc<dyn Engine>, track: &str) -> Vec<Position> {
    let history = engine.history(track, 0, 10_000).await.expect("history");
    history.messages.iter().map(|m| m.pos).collect()
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(segment::DIR_NAME).join(segment::file_name(seq))
}

/// Where each frame of a segment starts, and where the last one's bytes end (before
/// its padding).
fn frames(path: &Path) -> (Vec<u64>, u64) {
    let bytes = std::fs::read(path).expect("read the segment");
    let mut starts = Vec::new();
    segment::scan(&bytes, |at, _| {
        starts.push(at);
        Ok(())
    })
    .expect("a sound segment");
    let last = *starts.last().expect("frames") as usize;
    let len = u32::from_le_bytes(bytes[last..last + 4].try_into().expect("4 bytes"));
    (starts, last as u64 + 8 + u64::from(len))
}

/// Copies the store in `from` (redb's file and the log) into `to`.
fn copy_store(from: &Path, to: &Path) {
    std::fs::copy(from.join(embedded::FILE_NAME), to.join(embedded::FILE_NAME)).expect("copy redb");
    std::fs::create_dir_all(to.join(segment::DIR_NAME)).expect("log dir");
    for seq in segment::list(&from.join(segment::DIR_NAME)).expect("segments") {
        std::fs::copy(segment_path(from, seq), segment_path(to, seq)).expect("copy segment");
    }
}

/// The engine's answer for the store in `dir`, which must be that it is damaged and
/// what to run.
fn assert_damaged(dir: &Path) {
    match LogStorage::open(dir) {
        Err(EngineError::Corrupt(said)) => assert!(
            said.contains("is damaged") && said.contains("dolores repair --data"),
            "{said}"
        ),
        Err(other) => panic!("not reported as damaged: {other}"),
        Ok(_) => panic!("a damaged log opened"),
    }
}

const N: u64 = 5;

/// A store with messages 1 to N on `:t`, each appended (and so framed) on its own.
async fn store_with_n_frames(dir: &Path) {
    let engine = open(dir, segment::SEGMENT_BYTES, 1000);
    for n in 1..=N {
        let at = engine.append(vec![update(":t", n)]).await.expect("append");
        assert_eq!(at, [n]);
    }
    close(engine).await;
}

#[tokio::test]
async fn a_last_frame_torn_at_any_byte_is_cut_and_the_log_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    store_with_n_frames(dir.path()).await;
    let (starts, last_end) = frames(&segment_path(dir.path(), 1));
    assert_eq!(starts.len() as u64, N);
    let last_start = starts[N as usize - 1];
    for cut in last_start..last_end {
        let copy = tempfile::tempdir().expect("tempdir");
        copy_store(dir.path(), copy.path());
        let segment = std::fs::OpenOptions::new()
            .write(true)
            .open(segment_path(copy.path(), 1))
            .expect("open the copy");
        segment.set_len(cut).expect("truncate");
        drop(segment);

        let engine = open(copy.path(), segment::SEGMENT_BYTES, 1000);
        let first: Vec<Position> = (1..N).collect();
        assert_eq!(positions(&engine, ":t").await, first, "cut at {cut}");
        assert_eq!(engine.counts().await.expect("counts").messages, N - 1);
        let next = engine.append(vec![update(":t", N)]).await.expect("append");
        assert_eq!(next, [N], "cut at {cut}: the next position");
        close(engine).await;

        let engine = open(copy.path(), segment::SEGMENT_BYTES, 1000);
        let all: Vec<Position> = (1..=N).collect();
        assert_eq!(
            positions(&engine, ":t").await,
            all,
            "cut at {cut}: reopened"
        );
        close(engine).await;
    }
}

#[tokio::test]
async fn zeros_or_garbage_after_the_last_frame_are_a_torn_tail_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    store_with_n_frames(dir.path()).await;
    let path = segment_path(dir.path(), 1);
    let (_, last_end) = frames(&path);
    // A frame being written when the power went: its header never reached the disk,
    // a later page of it did.
    let mut bytes = std::fs::read(&path).expect("read");
    let at = last_end.next_multiple_of(8) as usize + 64;
    bytes.resize(bytes.len().max(at + 100), 0);
    bytes[at..at + 100].fill(0xAB);
    std::fs::write(&path, bytes).expect("write");
    let engine = open(dir.path(), segment::SEGMENT_BYTES, 1000);
    assert_eq!(positions(&engine, ":t").await, (1..=N).collect::<Vec<_>>());
    assert_eq!(
        engine.append(vec![update(":t", 9)]).await.expect("append"),
        [N + 1]
    );
    close(engine).await;
    let engine = open(dir.path(), segment::SEGMENT_BYTES, 1000);
    assert_eq!(
        positions(&engine, ":t").await,
        (1..=N + 1).collect::<Vec<_>>()
    );
    close(engine).await;
}

#[tokio::test]
async fn a_flipped_byte_in_a_middle_frame_is_damage_that_repair_cuts() {
    let dir = tempfile::tempdir().expect("tempdir");
    store_with_n_frames(dir.path()).await;
    let path = segment_path(dir.path(), 1);
    let (starts, _) = frames(&path);
    let sound = std::fs::read(&path).expect("read");
    // Any byte of the second frame, its header included (not its padding, which holds
    // nothing).
    let second = starts[1] as usize;
    let len = u32::from_le_bytes(sound[second..second + 4].try_into().expect("4 bytes"));
    for at in starts[1]..starts[1] + 8 + u64::from(len) {
        let mut bytes = sound.clone();
        bytes[at as usize] ^= 0x5A;
        std::fs::write(&path, &bytes).expect("write");
        if bytes[starts[1] as usize..starts[1] as usize + 8] == [0; 8] {
            continue; // not a flip that can happen to a header of this frame
        }
        assert_damaged(dir.path());
    }
    let mut bytes = sound.clone();
    bytes[starts[1] as usize + 20] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    match check(dir.path(), false) {
        Err(EngineError::Corrupt(said)) => assert!(said.contains(".seg"), "{said}"),
        other => panic!("check passed a damaged log: {other:?}"),
    }
    assert!(!check(dir.path(), true).expect("repair"), "repaired");
    assert!(
        check(dir.path(), false).expect("check"),
        "sound after repair"
    );
    let engine = open(dir.path(), segment::SEGMENT_BYTES, 1000);
    assert_eq!(positions(&engine, ":t").await, [1], "cut at the damage");
    assert_eq!(
        engine.append(vec![update(":t", 2)]).await.expect("append"),
        [2]
    );
    close(engine).await;
}

#[tokio::test]
async fn retention_deletes_whole_segments_and_keeps_their_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), 4096, 20);
    let keyed = vec![update(":t", 0)];
    let key = IdempotencyKey::new(b"key-1", &keyed).expect("key");
    let first = engine
        .append_with_key(keyed.clone(), Some(key.clone()))
        .await
        .expect("append");
    assert_eq!(first.positions, [1]);
    for n in 1..300 {
        engine.append(vec![update(":t", n)]).await.expect("append");
    }
    let segments = segment::list(&dir.path().join(segment::DIR_NAME)).expect("list");
    assert!(
        segments.len() <= 3 && segments.first().is_some_and(|&s| s > 1),
        "old segments deleted: {segments:?}"
    );
    assert_eq!(
        positions(&engine, ":t").await,
        (281..=300).collect::<Vec<_>>()
    );
    close(engine).await;

    let engine = open(dir.path(), 4096, 20);
    assert_eq!(
        positions(&engine, ":t").await,
        (281..=300).collect::<Vec<_>>()
    );
    let again = engine
        .append_with_key(keyed, Some(key))
        .await
        .expect("append");
    assert!(again.repeated, "the key outlived its segment");
    assert_eq!(again.positions, [1]);
    assert_eq!(
        engine.append(vec![update(":t", 1)]).await.expect("append"),
        [301]
    );
    close(engine).await;
}

#[tokio::test]
async fn a_store_from_before_the_log_moves_its_messages_into_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let redb = RedbStorage::open(dir.path()).expect("redb");
        let old: Vec<Arc<Message>> = (1..=3)
            .map(|pos| {
                let json = format!("{{\"n\":{pos}}}");
                Arc::new(Message::new(pos, ":t".into(), json.into(), now_ms()))
            })
            .collect();
        redb.write_old_log(&old).expect("old messages");
    }
    let engine = open(dir.path(), segment::SEGMENT_BYTES, 1000);
    let history = engine.history(":t", 0, 10).await.expect("history");
    let texts: Vec<&str> = history.messages.iter().map(|m| &*m.json).collect();
    assert_eq!(texts, ["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
    assert_eq!(
        engine.append(vec![update(":t", 4)]).await.expect("append"),
        [4]
    );
    close(engine).await;
    let redb = RedbStorage::open(dir.path()).expect("redb");
    assert!(
        redb.old_log().expect("read").is_none(),
        "redb's copy is gone"
    );
    drop(redb);
    let engine = open(dir.path(), segment::SEGMENT_BYTES, 1000);
    assert_eq!(positions(&engine, ":t").await, [1, 2, 3, 4]);
    close(engine).await;
}

#[tokio::test]
async fn old_texts_are_read_back_from_their_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), segment::SEGMENT_BYTES, 1000);
    for n in 1..=3 {
        engine.append(vec![update(":t", n)]).await.expect("append");
    }
    close(engine).await;
    // Nothing is cached after a reopen: every text comes from the file.
    let engine = open(dir.path(), segment::SEGMENT_BYTES, 1000);
    let history = engine.history(":t", 1, 10).await.expect("history");
    let texts: Vec<&str> = history.messages.iter().map(|m| &*m.json).collect();
    assert_eq!(texts, ["{\"n\":2}", "{\"n\":3}"]);
    close(engine).await;
}

#[tokio::test]
async fn a_torn_tail_in_the_newest_of_several_segments_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), 4096, 1000);
    for n in 1..=200 {
        engine.append(vec![update(":t", n)]).await.expect("append");
    }
    close(engine).await;
    let segments = segment::list(&dir.path().join(segment::DIR_NAME)).expect("list");
    assert!(segments.len() > 3, "rolled over: {segments:?}");
    let newest = segment_path(dir.path(), *segments.last().expect("segments"));
    let (starts, end) = frames(&newest);
    let last = *starts.last().expect("frames");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .expect("open");
    file.set_len((last + end) / 2).expect("truncate");
    drop(file);

    let engine = open(dir.path(), 4096, 1000);
    assert_eq!(positions(&engine, ":t").await, (1..200).collect::<Vec<_>>());
    assert_eq!(
        engine
            .append(vec![update(":t", 200)])
            .await
            .expect("append"),
        [200]
    );
    close(engine).await;
    let engine = open(dir.path(), 4096, 1000);
    assert_eq!(
        positions(&engine, ":t").await,
        (1..=200).collect::<Vec<_>>()
    );
    close(engine).await;
}
