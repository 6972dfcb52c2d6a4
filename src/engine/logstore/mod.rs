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
//!   [`index::CACHED_BODY_BYTES`]) is kept too, older texts are read back from their segment.
//!   All of it is rebuilt by reading the segments at open.
//!
//! Here: the storage, its read view and its transaction; `index` is the in-memory
//! index, `recovery` the reading of the segments at open, `dolores check`/`repair`, and
//! the move of a store from before the log; `tests` its own tests.
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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::ReadTransaction;

mod index;
mod recovery;

pub(crate) use recovery::check;

use index::{LogState, Segment, Stored};
use recovery::{load, migrate};

use super::embedded::{RedbStorage, RedbTxn};
use super::local::{Bounds, KeyRecord, Snapshot, Storage, StorageTxn};
use super::segment::{self, FrameBuilder, SegmentWriter};
use super::{EngineError, Listener, Message, Position, Result, StoreCounts};

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
    /// Set when a commit failed in writing its frame, before redb was touched: then
    /// `recover` has nothing to reopen.
    only_the_log_failed: AtomicBool,
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
            only_the_log_failed: AtomicBool::new(false),
        })
    }

    fn state(&self) -> RwLockReadGuard<'_, LogState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, LogState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
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

    /// Reopens redb's file, unless only the log failed: the log's writer needs nothing
    /// to write again (its next frame goes where the failed one would have), and a
    /// reopen would fail every read meanwhile — each publish refused on a full disk
    /// would cost every open stream a failed read.
    fn recover(&self) -> Result<()> {
        if self.only_the_log_failed.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
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
            self.commit_log().inspect_err(|_| {
                self.storage
                    .only_the_log_failed
                    .store(true, Ordering::Relaxed);
            })?;
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
            state.push(message.pos, stored, index::CACHED_BODY_BYTES);
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
mod tests;
