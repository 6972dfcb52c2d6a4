//! The durable storage (the default): messages in an append-only segment log, the
//! listeners in a small redb file beside it.
//!
//! # What lives where
//!
//! - `DATA/log/*.seg` (`segment`): every message, every idempotency key (it must be
//!   atomic with the messages it stored) and the log's bounds. One group commit is one
//!   frame: one `write`, one `fdatasync`.
//! - `DATA/dolores.redb` (`embedded`'s tables): listeners, subscriptions, cursors,
//!   revocations. A commit that touches none of them does not commit redb at all —
//!   which is every publish-only group, and the whole point: a redb commit costs about
//!   11 page writes and a sync, a frame one write and one sync.
//! - In memory: a per-track index of positions and, for every kept message, where its
//!   text is in which segment (about 60 bytes a message), so a listener's queue read
//!   (`track_after`) is a range lookup; the text of the newest messages (up to
//!   [`CACHED_BODY_BYTES`]) is kept too, older texts are read back from their segment.
//!   All of it is rebuilt by reading the segments at open.
//!
//! # Sync order
//!
//! A group that touches both writes the log frame and syncs it first, then commits
//! redb. A crash between the two keeps the messages (nobody was told: their callers had
//! no answer yet) and loses the group's connects, disconnects and cursor writes (whose
//! callers had no answer either; cursors are written lazily anyway and may go back by
//! up to a tick, as before). The other order could leave redb naming a position the
//! log lost — a listener whose subscription or cursor lies past the head — which the
//! log-first order rules out: redb only ever names positions already synced.
//! Readers take their redb snapshot before the log's, for the same reason. If redb's
//! commit fails after the frame was synced (a disk that filled up: the log writes into
//! space zero-filled earlier, redb needs new pages), the callers hear the failure but
//! the messages stay — an unknown outcome, like an answer lost on the way, which an
//! `Idempotency-Key` makes safe to retry — and open streams are told to catch up from
//! the store (`Change::Lost`), so none of them misses one.
//!
//! # Retention
//!
//! Trimming (retention, `max_stored_messages`) moves the trimmed-through bound, written
//! in the next frame. A segment all of whose messages are trimmed is deleted whole once
//! a newer segment is being written; the idempotency keys recorded in it that are still
//! kept are first written again into the current frame, so no key is lost with it.
//!
//! # Recovery
//!
//! See `segment` for the rule (a torn last frame is cut; a damaged frame followed by a
//! whole one is `Corrupt`, with the repair hint). Positions must follow one another
//! without a gap across all segments; otherwise the log is damaged too.
//!
//! # A store from before the log
//!
//! A data dir with only `dolores.redb` (its messages in redb's `log` table) is
//! migrated once as it opens: its messages, keys and bounds are written into the first
//! segment and synced, then redb's message tables are emptied. A crash between the two
//! is safe: a log that has segments is never migrated into again, and the leftover
//! tables are emptied at the next open.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::ReadTransaction;

use super::embedded::{self, RedbStorage, RedbTxn};
use super::local::{Bounds, KeyRecord, Snapshot, Storage, StorageTxn};
use super::segment::{self, Entry, FrameBuilder, SegmentWriter};
use super::{EngineError, Listener, Message, Position, Result, StoreCounts};

/// Message texts kept in memory, newest first: enough for every listener that is
/// keeping up (and the tens of thousands of messages a burst holds), while memory does
/// not grow with `max_stored_messages`; older texts are one `pread` away.
pub(crate) const CACHED_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Messages per frame when a store from before the log is migrated into it.
const MIGRATION_FRAME_MESSAGES: usize = 10_000;

/// Where a kept message is.
#[derive(Debug)]
struct Stored {
    time_ms: u64,
    track: Arc<str>,
    seq: u64,
    json_at: u64,
    json_len: u32,
    /// Its text, while it is among the newest.
    cached: Option<Arc<Message>>,
}

/// A segment that is kept.
#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    /// The newest position in it (0: none).
    last_pos: Position,
}

/// The log as readers see it.
#[derive(Debug, Default)]
struct LogState {
    bounds: Bounds,
    /// The position of `entries[0]` (`trimmed_through + 1` once open).
    base: Position,
    entries: VecDeque<Stored>,
    /// Each track's kept positions, in order.
    by_track: HashMap<Arc<str>, VecDeque<Position>>,
    /// Texts cached are those of positions from this one on.
    cached_from: Position,
    cached_bytes: usize,
    /// Idempotency keys, with the segment their newest record is in.
    keys: HashMap<String, (KeyRecord, u64)>,
    /// The same keys oldest first, for expiry.
    keys_by_age: BTreeSet<(u64, String)>,
    segments: BTreeMap<u64, Segment>,
    /// Whether `load_frame` took in a frame yet (the first one sets where it starts).
    loaded_a_frame: bool,
}

impl LogState {
    fn intern(&self, track: &str) -> Arc<str> {
        self.by_track
            .get_key_value(track)
            .map_or_else(|| track.into(), |(name, _)| name.clone())
    }

    /// Adds the message at `head + 1`.
    fn push(&mut self, pos: Position, stored: Stored) {
        if self.entries.is_empty() {
            self.base = pos;
        }
        if let Some(message) = &stored.cached {
            self.cached_bytes += message.json.len();
        } else {
            self.cached_from = pos + 1;
        }
        self.by_track
            .entry(stored.track.clone())
            .or_default()
            .push_back(pos);
        self.entries.push_back(stored);
        self.bounds.head = pos;
        while self.cached_bytes > CACHED_BODY_BYTES && self.cached_from <= pos {
            if let Some(entry) = self.entry_mut(self.cached_from)
                && let Some(message) = entry.cached.take()
            {
                self.cached_bytes -= message.json.len();
            }
            self.cached_from += 1;
        }
    }

    fn entry_mut(&mut self, pos: Position) -> Option<&mut Stored> {
        let at = pos.checked_sub(self.base)?;
        self.entries.get_mut(usize::try_from(at).ok()?)
    }

    fn entry(&self, pos: Position) -> Option<&Stored> {
        let at = pos.checked_sub(self.base)?;
        self.entries.get(usize::try_from(at).ok()?)
    }

    /// Drops the messages up to `trimmed_through` from the index.
    fn trim(&mut self, trimmed_through: Position) {
        self.bounds.trimmed_through = trimmed_through;
        while self.base <= trimmed_through
            && let Some(stored) = self.entries.pop_front()
        {
            if let Some(message) = &stored.cached {
                self.cached_bytes -= message.json.len();
            }
            if let Some(positions) = self.by_track.get_mut(&stored.track) {
                positions.pop_front();
                if positions.is_empty() {
                    self.by_track.remove(&stored.track);
                }
            }
            self.base += 1;
        }
        if self.entries.is_empty() {
            self.base = self.bounds.head + 1;
        }
        self.cached_from = self.cached_from.max(self.base);
    }

    fn put_key(&mut self, key: &str, record: KeyRecord, seq: u64) {
        self.keys_by_age.insert((record.time_ms, key.to_owned()));
        if let Some((old, _)) = self.keys.insert(key.to_owned(), (record, seq))
            && let Some((new, _)) = self.keys.get(key)
            && old.time_ms != new.time_ms
        {
            self.keys_by_age.remove(&(old.time_ms, key.to_owned()));
        }
    }

    /// Forgets the keys recorded before `before_ms`.
    fn expire_keys(&mut self, before_ms: u64) {
        while let Some((time, _)) = self.keys_by_age.first()
            && *time < before_ms
        {
            if let Some((_, key)) = self.keys_by_age.pop_first() {
                self.keys.remove(&key);
            }
        }
    }

    /// The message at `pos`, from the cache or its segment.
    fn message(&self, pos: Position) -> Result<Option<Arc<Message>>> {
        let Some(stored) = self.entry(pos) else {
            return Ok(None);
        };
        if let Some(message) = &stored.cached {
            return Ok(Some(message.clone()));
        }
        let segment = self.segments.get(&stored.seq).ok_or_else(|| {
            EngineError::Storage(format!("message {pos}: segment {} is gone", stored.seq))
        })?;
        let json = segment::read_text(&segment.file, stored.json_at, stored.json_len)
            .map_err(|e| EngineError::Storage(format!("cannot read message {pos}: {e}")))?;
        Ok(Some(Arc::new(Message::new(
            pos,
            stored.track.clone(),
            json.into(),
            stored.time_ms,
        ))))
    }

    fn track_after(&self, track: &str, after: Position, limit: usize) -> Result<Vec<Arc<Message>>> {
        let Some(positions) = self.by_track.get(track) else {
            return Ok(Vec::new());
        };
        let first = positions.partition_point(|&p| p <= after);
        let mut messages = Vec::with_capacity(limit.min(positions.len() - first));
        for &pos in positions.range(first..).take(limit) {
            if let Some(message) = self.message(pos)? {
                messages.push(message);
            }
        }
        Ok(messages)
    }

    /// The segments older than `current` whose messages are all trimmed.
    fn dead_segments(&self, trimmed_through: Position, current: u64) -> Vec<u64> {
        self.segments
            .range(..current)
            .filter(|(_, s)| s.last_pos <= trimmed_through)
            .map(|(&seq, _)| seq)
            .collect()
    }

    /// Takes in one frame read at open from segment `seq`: its positions must follow
    /// the ones before.
    fn load_frame(&mut self, seq: u64, entries: Vec<Entry<'_>>) -> std::result::Result<(), String> {
        let Some(Entry::Bounds(bounds)) = entries.first() else {
            return Err("a frame without bounds".into());
        };
        let bounds = *bounds;
        let count = entries
            .iter()
            .filter(|e| matches!(e, Entry::Message { .. }))
            .count() as u64;
        // The first frame read may follow messages in segments deleted since.
        if !self.loaded_a_frame {
            self.loaded_a_frame = true;
            self.bounds.head = bounds
                .head
                .checked_sub(count)
                .ok_or("a head before its messages")?;
        }
        for entry in entries {
            match entry {
                Entry::Bounds(_) => {}
                Entry::Message {
                    pos,
                    time_ms,
                    track,
                    json,
                    json_at,
                } => {
                    if pos != self.bounds.head + 1 {
                        return Err(format!(
                            "message {pos} follows message {}",
                            self.bounds.head
                        ));
                    }
                    let stored = Stored {
                        time_ms,
                        track: self.intern(track),
                        seq,
                        json_at,
                        json_len: json.len() as u32,
                        cached: None,
                    };
                    self.push(pos, stored);
                }
                Entry::Key { key, record } => self.put_key(key, record, seq),
                Entry::ExpireKeys { before_ms } => self.expire_keys(before_ms),
            }
        }
        if self.bounds.head != bounds.head {
            return Err(format!(
                "the frame says the head is {}, its messages end at {}",
                bounds.head, self.bounds.head
            ));
        }
        self.trim(bounds.trimmed_through.max(self.bounds.trimmed_through));
        if let Some(segment) = self.segments.get_mut(&seq) {
            segment.last_pos = segment
                .last_pos
                .max(if count > 0 { bounds.head } else { 0 });
        }
        Ok(())
    }
}

/// Where the damage that stops a log from opening is.
#[derive(Debug)]
struct Damaged {
    seq: u64,
    at: u64,
    error: EngineError,
}

/// The storage. See the module docs.
#[derive(Debug)]
pub(crate) struct LogStorage {
    redb: RedbStorage,
    state: RwLock<LogState>,
    writer: Mutex<SegmentWriter>,
    log_dir: PathBuf,
    /// Set when a commit's frame was synced but its redb part failed (see
    /// `Storage::take_partial_commit`): its callers are told it failed, though its
    /// messages are kept (like any answer lost on the way, an "unknown" outcome).
    partial_commit: AtomicBool,
}

fn corrupt_segment(data_dir: &Path, path: &Path, what: &str) -> EngineError {
    EngineError::Corrupt(format!(
        "the log segment {} is damaged ({what}): {}",
        path.display(),
        segment::repair_hint(data_dir)
    ))
}

/// Reads every segment of `log_dir` into a fresh state. With `cut_torn_tail`, a torn
/// last frame is cut off the file; without, the files are only read (`dolores check`).
fn load(
    data_dir: &Path,
    log_dir: &Path,
    cut_torn_tail: bool,
) -> std::result::Result<(LogState, u64, segment::ScanEnd), Damaged> {
    let engine = |error| Damaged {
        seq: 0,
        at: 0,
        error,
    };
    let seqs = segment::list(log_dir).map_err(engine)?;
    let mut state = LogState::default();
    let mut last = (
        0,
        segment::ScanEnd {
            valid_end: 0,
            torn: false,
        },
    );
    for (i, &seq) in seqs.iter().enumerate() {
        let (file, path) = segment::open_file(log_dir, seq, false).map_err(engine)?;
        let bytes = std::fs::read(&path)
            .map_err(|e| engine(segment::io_error("cannot read", &path, &e)))?;
        let is_last = i + 1 == seqs.len();
        // Registered before its frames are read, so they can say where they are.
        state.segments.insert(
            seq,
            Segment {
                file: Arc::new(file),
                last_pos: 0,
            },
        );
        let end = segment::scan(&bytes, |_, entries| state.load_frame(seq, entries)).map_err(
            |damage| Damaged {
                seq,
                at: damage.at,
                error: corrupt_segment(data_dir, &path, &damage.what),
            },
        )?;
        if end.torn && !is_last {
            return Err(Damaged {
                seq,
                at: end.valid_end,
                error: corrupt_segment(
                    data_dir,
                    &path,
                    &format!("the frame at byte {} is damaged", end.valid_end),
                ),
            });
        }
        if end.torn && cut_torn_tail {
            tracing::warn!(
                "{}: cut a torn frame at byte {} (written when the server stopped, never acknowledged)",
                path.display(),
                end.valid_end
            );
            let cut = state.segments.get(&seq).map(|s| {
                s.file
                    .set_len(end.valid_end)
                    .and_then(|()| s.file.sync_all())
            });
            if let Some(Err(e)) = cut {
                return Err(engine(segment::io_error("cannot cut", &path, &e)));
            }
        }
        last = (seq, end);
    }
    // Every kept position must be there: from just after trimmed_through to the head.
    let bounds = state.bounds;
    let kept_from = if state.entries.is_empty() {
        bounds.head + 1
    } else {
        state.base
    };
    if kept_from != bounds.trimmed_through + 1 {
        let path = log_dir.join(segment::file_name(seqs.first().copied().unwrap_or(0)));
        return Err(engine(corrupt_segment(
            data_dir,
            &path,
            &format!(
                "messages {} to {} are missing",
                bounds.trimmed_through + 1,
                kept_from.saturating_sub(1)
            ),
        )));
    }
    Ok((state, last.0, last.1))
}

/// Checks the store in `dir` (see `engine::check_embedded`): redb's file as before,
/// then the log, read without changing it. A torn last frame is what a crash leaves
/// and is sound (the next start cuts it). With `repair`, a damaged log is cut at the
/// damage: the damaged frame and everything after it are dropped.
pub(crate) fn check(dir: &Path, repair: bool) -> Result<bool> {
    let redb_sound = embedded::check(dir, repair)?;
    let log_dir = dir.join(segment::DIR_NAME);
    if !log_dir.is_dir() {
        // A store from before the log: its messages are in redb, moved at next start.
        return Ok(redb_sound);
    }
    match load(dir, &log_dir, false) {
        Ok(_) => Ok(redb_sound),
        Err(damaged) if !repair || damaged.seq == 0 => Err(damaged.error),
        Err(damaged) => {
            cut_log(&log_dir, damaged.seq, damaged.at)?;
            load(dir, &log_dir, true).map_err(|d| d.error)?;
            Ok(false)
        }
    }
}

/// Cuts the log at byte `at` of segment `seq`: that segment is truncated there, every
/// later one deleted.
fn cut_log(log_dir: &Path, seq: u64, at: u64) -> Result<()> {
    let (file, path) = segment::open_file(log_dir, seq, false)?;
    file.set_len(at)
        .and_then(|()| file.sync_all())
        .map_err(|e| segment::io_error("cannot cut", &path, &e))?;
    for later in segment::list(log_dir)?.into_iter().filter(|&s| s > seq) {
        let path = log_dir.join(segment::file_name(later));
        std::fs::remove_file(&path).map_err(|e| segment::io_error("cannot delete", &path, &e))?;
    }
    segment::sync_dir(log_dir)
}

impl LogStorage {
    /// Opens or creates the store in `dir` (created if missing).
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, segment::SEGMENT_BYTES)
    }

    /// [`LogStorage::open`] with segments of `segment_bytes` (small in tests, so that
    /// retention has whole segments to delete).
    pub(crate) fn open_with(dir: &Path, segment_bytes: u64) -> Result<Self> {
        let redb = RedbStorage::open(dir)?;
        let log_dir = dir.join(segment::DIR_NAME);
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| segment::io_error("cannot create", &log_dir, &e))?;
        if segment::list(&log_dir)?.is_empty() {
            migrate(&redb, &log_dir, segment_bytes)?;
        }
        // Left by a migration that stopped after the log was synced: already moved.
        redb.forget_old_log()?;
        let (state, seq, end) = load(dir, &log_dir, true).map_err(|d| d.error)?;
        let file = state
            .segments
            .get(&seq)
            .map(|s| s.file.clone())
            .ok_or_else(|| EngineError::Storage(format!("{}: no segment", log_dir.display())))?;
        let writer = SegmentWriter::new(&log_dir, seq, file, end.valid_end, segment_bytes)?;
        Ok(Self {
            redb,
            state: RwLock::new(state),
            writer: Mutex::new(writer),
            log_dir,
            partial_commit: AtomicBool::new(false),
        })
    }

    fn state(&self) -> RwLockReadGuard<'_, LogState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, LogState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts the log in `log_dir` (which has no segment): empty, or with what a store
/// from before the log kept in redb. See the module doc.
fn migrate(redb: &RedbStorage, log_dir: &Path, segment_bytes: u64) -> Result<()> {
    let (file, _) = segment::open_file(log_dir, 1, true)?;
    segment::sync_dir(log_dir)?;
    let Some(old) = redb.old_log()? else {
        return Ok(());
    };
    tracing::info!(
        "moving {} message(s) from {} into the log in {}",
        old.messages.len(),
        embedded::FILE_NAME,
        log_dir.display()
    );
    let mut writer = SegmentWriter::new(log_dir, 1, Arc::new(file), 0, segment_bytes)?;
    let mut head = old
        .messages
        .first()
        .map_or(old.bounds.head, |(pos, ..)| pos - 1);
    let chunks = old.messages.chunks(MIGRATION_FRAME_MESSAGES);
    let mut frames = Vec::new();
    for chunk in chunks {
        head += chunk.len() as u64;
        let mut frame = FrameBuilder::new(Bounds {
            head,
            trimmed_through: old.bounds.trimmed_through,
        });
        for (pos, time_ms, track, json) in chunk {
            let message = Message::new(*pos, track.as_str().into(), json.as_str().into(), *time_ms);
            frame.message(&message);
        }
        frames.push(frame);
    }
    // The bounds (and the keys) go in a last frame, so an empty log keeps its head.
    let mut last = FrameBuilder::new(old.bounds);
    for (key, record) in &old.keys {
        last.key(key, record);
    }
    frames.push(last);
    for frame in frames {
        writer.append(&frame.finish())?;
    }
    Ok(())
}

/// A read view: redb's snapshot, then the log's (see the module doc for the order).
pub(crate) struct LogSnap<'a> {
    redb: ReadTransaction,
    state: RwLockReadGuard<'a, LogState>,
}

/// The write transaction: log changes are gathered and written as one frame at
/// commit; redb's write transaction is begun only by a change to its tables.
pub(crate) struct LogTxn<'a> {
    storage: &'a LogStorage,
    /// For reads of redb's tables before any write to them.
    redb_read: OnceLock<ReadTransaction>,
    redb_write: Option<RedbTxn>,
    /// The bounds when the transaction began.
    committed: Bounds,
    /// The bounds to write.
    bounds: Bounds,
    /// Trimmed so far in this transaction (`delete_oldest`).
    trimmed: Position,
    appended: Vec<Arc<Message>>,
    keys: Vec<(String, KeyRecord)>,
    expire_before: Option<u64>,
}

impl Storage for LogStorage {
    type Snap<'a> = LogSnap<'a>;
    type Txn<'a> = LogTxn<'a>;

    fn read(&self) -> Result<LogSnap<'_>> {
        let redb = self.redb.read()?;
        Ok(LogSnap {
            redb,
            state: self.state(),
        })
    }

    fn write(&self) -> Result<LogTxn<'_>> {
        let committed = self.state().bounds;
        Ok(LogTxn {
            storage: self,
            redb_read: OnceLock::new(),
            redb_write: None,
            committed,
            bounds: committed,
            trimmed: committed.trimmed_through,
            appended: Vec::new(),
            keys: Vec::new(),
            expire_before: None,
        })
    }

    fn corrupt(&self, what: &str) -> EngineError {
        self.redb.corrupt(what)
    }

    fn recover(&self) -> Result<()> {
        self.redb.recover()
    }

    fn take_partial_commit(&self) -> bool {
        self.partial_commit.swap(false, Ordering::Relaxed)
    }
}

impl Snapshot for LogSnap<'_> {
    fn bounds(&self) -> Result<Bounds> {
        Ok(self.state.bounds)
    }

    fn listener(&self, uid: &str) -> Result<Option<Listener>> {
        self.redb.listener(uid)
    }

    fn track_after(&self, track: &str, after: Position, limit: usize) -> Result<Vec<Arc<Message>>> {
        self.state.track_after(track, after, limit)
    }

    fn counts(&self) -> Result<StoreCounts> {
        Ok(StoreCounts {
            messages: self.state.entries.len() as u64,
            ..self.redb.counts()?
        })
    }

    fn subscribers(&self, track: &str, after: &str, limit: usize) -> Result<(u64, Vec<String>)> {
        self.redb.subscribers(track, after, limit)
    }

    fn stale_listeners(&self, seen_before_ms: u64, limit: usize) -> Result<Vec<String>> {
        self.redb.stale_listeners(seen_before_ms, limit)
    }

    fn revocation(&self, uid: &str) -> Result<Option<u64>> {
        self.redb.revocation(uid)
    }

    fn old_revocations(&self, before_ms: u64, limit: usize) -> Result<Vec<String>> {
        self.redb.old_revocations(before_ms, limit)
    }
}

impl LogTxn<'_> {
    /// redb's tables as this transaction sees them.
    fn redb(&self) -> Result<&dyn Snapshot> {
        if let Some(txn) = &self.redb_write {
            return Ok(txn);
        }
        if let Some(read) = self.redb_read.get() {
            return Ok(read);
        }
        let read = self.storage.redb.read()?;
        Ok(self.redb_read.get_or_init(|| read))
    }

    /// redb's write transaction, begun on the first change to its tables.
    fn redb_mut(&mut self) -> Result<&mut RedbTxn> {
        if self.redb_write.is_none() {
            self.redb_read = OnceLock::new();
            self.redb_write = Some(self.storage.redb.write()?);
        }
        self.redb_write
            .as_mut()
            .ok_or_else(|| EngineError::Storage("no redb transaction".into()))
    }

    fn log_changed(&self) -> bool {
        !self.appended.is_empty()
            || !self.keys.is_empty()
            || self.expire_before.is_some()
            || self.bounds != self.committed
    }
}

impl Snapshot for LogTxn<'_> {
    fn bounds(&self) -> Result<Bounds> {
        Ok(self.committed)
    }

    fn listener(&self, uid: &str) -> Result<Option<Listener>> {
        self.redb()?.listener(uid)
    }

    fn track_after(&self, track: &str, after: Position, limit: usize) -> Result<Vec<Arc<Message>>> {
        self.storage.state().track_after(track, after, limit)
    }

    fn counts(&self) -> Result<StoreCounts> {
        Ok(StoreCounts {
            messages: self.storage.state().entries.len() as u64,
            ..self.redb()?.counts()?
        })
    }

    fn subscribers(&self, track: &str, after: &str, limit: usize) -> Result<(u64, Vec<String>)> {
        self.redb()?.subscribers(track, after, limit)
    }

    fn stale_listeners(&self, seen_before_ms: u64, limit: usize) -> Result<Vec<String>> {
        self.redb()?.stale_listeners(seen_before_ms, limit)
    }

    fn revocation(&self, uid: &str) -> Result<Option<u64>> {
        self.redb()?.revocation(uid)
    }

    fn old_revocations(&self, before_ms: u64, limit: usize) -> Result<Vec<String>> {
        self.redb()?.old_revocations(before_ms, limit)
    }
}

impl StorageTxn for LogTxn<'_> {
    fn append(&mut self, message: &Arc<Message>) -> Result<()> {
        self.appended.push(message.clone());
        Ok(())
    }

    fn oldest(&self) -> Result<Option<(Position, u64)>> {
        let pos = self.trimmed + 1;
        if pos <= self.committed.head {
            Ok(self.storage.state().entry(pos).map(|s| (pos, s.time_ms)))
        } else {
            let at = (pos - self.committed.head - 1) as usize;
            Ok(self.appended.get(at).map(|m| (pos, m.time_ms)))
        }
    }

    fn delete_oldest(&mut self) -> Result<()> {
        if let Some((pos, _)) = self.oldest()? {
            self.trimmed = pos;
        }
        Ok(())
    }

    fn put_listener(&mut self, listener: &Listener) -> Result<()> {
        self.redb_mut()?.put_listener(listener)
    }

    fn remove_listener(&mut self, uid: &str) -> Result<()> {
        self.redb_mut()?.remove_listener(uid)
    }

    fn put_revocation(&mut self, uid: &str, at_ms: u64) -> Result<()> {
        self.redb_mut()?.put_revocation(uid, at_ms)
    }

    fn remove_revocation(&mut self, uid: &str) -> Result<()> {
        self.redb_mut()?.remove_revocation(uid)
    }

    fn set_subscribed(&mut self, track: &str, uid: &str, subscribed: bool) -> Result<()> {
        self.redb_mut()?.set_subscribed(track, uid, subscribed)
    }

    fn set_bounds(&mut self, bounds: Bounds) -> Result<()> {
        self.bounds = bounds;
        Ok(())
    }

    fn idempotency_key(&self, key: &str) -> Result<Option<KeyRecord>> {
        if let Some((_, record)) = self.keys.iter().rev().find(|(k, _)| k == key) {
            return Ok(Some(record.clone()));
        }
        Ok(self.storage.state().keys.get(key).map(|(r, _)| r.clone()))
    }

    fn put_idempotency_key(&mut self, key: &str, record: &KeyRecord) -> Result<()> {
        self.keys.push((key.to_owned(), record.clone()));
        Ok(())
    }

    /// Forgets every key recorded before `before_ms`: one small entry in the frame
    /// however many, so `limit` (which bounds a B-tree's deletes) is not needed here.
    fn expire_idempotency_keys(&mut self, before_ms: u64, _limit: usize) -> Result<usize> {
        let state = self.storage.state();
        let expired = state
            .keys_by_age
            .iter()
            .take_while(|(time, _)| *time < before_ms)
            .count();
        drop(state);
        if expired > 0 {
            self.expire_before = Some(before_ms);
        }
        Ok(expired)
    }

    fn commit(mut self) -> Result<()> {
        let logged = self.log_changed();
        if logged {
            self.commit_log()?;
        }
        match self.redb_write.take() {
            Some(redb) => redb.commit().inspect_err(|_| {
                if logged && !self.appended.is_empty() {
                    self.storage.partial_commit.store(true, Ordering::Relaxed);
                }
            }),
            None => Ok(()),
        }
    }
}

impl LogTxn<'_> {
    /// Writes and syncs this transaction's frame, then shows it to readers and deletes
    /// the segments it made dead.
    fn commit_log(&mut self) -> Result<()> {
        let storage = self.storage;
        let mut writer = storage.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut frame = FrameBuilder::new(self.bounds);
        let json_ats: Vec<u64> = self.appended.iter().map(|m| frame.message(m)).collect();
        for (key, record) in &self.keys {
            frame.key(key, record);
        }
        if let Some(before_ms) = self.expire_before {
            frame.expire_keys(before_ms);
        }
        let (dead, carried) = {
            let state = storage.state();
            let dead = state.dead_segments(self.bounds.trimmed_through, writer.seq());
            let keep_after = self.expire_before.unwrap_or(0);
            // Looked for only when a segment dies: rare, and a scan of every key.
            let carried: Vec<(String, KeyRecord)> = if dead.is_empty() {
                Vec::new()
            } else {
                state
                    .keys
                    .iter()
                    .filter(|(_, (record, seq))| dead.contains(seq) && record.time_ms >= keep_after)
                    .map(|(key, (record, _))| (key.clone(), record.clone()))
                    .collect()
            };
            (dead, carried)
        };
        for (key, record) in &carried {
            frame.key(key, record);
        }
        let written = writer.append(&frame.finish())?;
        drop(writer);

        let mut state = storage.state_mut();
        if let Some(file) = written.new_file {
            state
                .segments
                .insert(written.seq, Segment { file, last_pos: 0 });
        }
        for (message, json_at) in self.appended.iter().zip(json_ats) {
            let stored = Stored {
                time_ms: message.time_ms,
                track: state.intern(&message.track),
                seq: written.seq,
                json_at: written.at + json_at,
                json_len: message.json.len() as u32,
                cached: Some(message.clone()),
            };
            state.push(message.pos, stored);
        }
        if let Some(last) = self.appended.last()
            && let Some(segment) = state.segments.get_mut(&written.seq)
        {
            segment.last_pos = last.pos;
        }
        state.trim(self.bounds.trimmed_through);
        for (key, record) in self.keys.drain(..).chain(carried) {
            state.put_key(&key, record, written.seq);
        }
        if let Some(before_ms) = self.expire_before {
            state.expire_keys(before_ms);
        }
        let mut gone = Vec::new();
        for seq in dead {
            if state.segments.remove(&seq).is_some() {
                gone.push(seq);
            }
        }
        drop(state);
        // Readers no longer reach them. A crash before the files go leaves segments
        // whose messages the log says are trimmed: a later commit deletes them.
        for seq in gone {
            let path = storage.log_dir.join(segment::file_name(seq));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("cannot delete {}: {e}", path.display());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "logstore_tests.rs"]
mod tests;
