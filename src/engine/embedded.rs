//! The redb file in the data dir, `dolores.redb`: since the segment log (`logstore`)
//! holds the messages, the durable store keeps only its listener tables here (and
//! reads the message tables once, to move a store from before the log). Its
//! `Storage` implementation, messages included, is kept whole: the tables are one
//! format, and the move reads them with it.
//!
//! Tables: `log` (position → time, track, message), `by_track` ((track, position) → ()),
//! the index that makes a listener's queue a range scan per track, `listeners`
//! (uid → JSON record), `subscribers` (track → count), `subscribed` ((track, uid) → (),
//! a track's listeners in uid order), `revocations` (uid → when its tokens were
//! revoked, ms), `meta` (the log's bounds), and `idempotency_keys` with
//! `idempotency_keys_by_age` (appends made with an `Idempotency-Key`, and the same oldest
//! first for expiry).
//! Every commit is durable (redb's `Immediate` durability: synced before `commit`
//! returns); the writer in `local` groups many updates into one commit.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{
    Database, Key, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, Value, WriteTransaction,
};

use super::local::{Bounds, KeyRecord, Snapshot, Storage, StorageTxn};
use super::{EngineError, Listener, Message, Position, Result, StoreCounts};

const LOG: TableDefinition<u64, (u64, &str, &str)> = TableDefinition::new("log");
const BY_TRACK: TableDefinition<(&str, u64), ()> = TableDefinition::new("by_track");
const LISTENERS: TableDefinition<&str, &[u8]> = TableDefinition::new("listeners");
const SUBSCRIBERS: TableDefinition<&str, u64> = TableDefinition::new("subscribers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Idempotency key → (time, digest, first position, count).
const KEYS: TableDefinition<&str, (u64, &str, u64, u64)> = TableDefinition::new("idempotency_keys");
/// (time, key) → (): the keys oldest first, for expiry.
const KEYS_BY_AGE: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("idempotency_keys_by_age");
const REVOCATIONS: TableDefinition<&str, u64> = TableDefinition::new("revocations");
const SUBSCRIBED: TableDefinition<(&str, &str), ()> = TableDefinition::new("subscribed");

/// redb's page cache. Its default (1 GiB) would let memory grow with the store; the
/// hot data — recent messages and the listeners being served — fits in much less.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// How many times (10 ms apart) a recovery waits for reads still holding the old handle.
const RECOVER_WAIT_TRIES: usize = 100;

/// The file's name inside the data dir.
pub(crate) const FILE_NAME: &str = "dolores.redb";

/// A redb error as the engine's: a full disk (ENOSPC) is told apart, because it heals
/// once space is freed and the caller should hear exactly that, and so is a damaged
/// file, which does not.
fn storage_error(e: impl std::fmt::Display) -> EngineError {
    let text = e.to_string();
    if text.contains("No space left on device") || text.contains("os error 28") {
        EngineError::Full(text)
    } else if text.to_ascii_lowercase().contains("corrupt") {
        // A page that fails its check: the file is damaged, which does not heal.
        EngineError::Corrupt(format!("the store file is damaged: {text}"))
    } else {
        EngineError::Storage(text)
    }
}

/// The redb database. After an I/O error redb refuses every later transaction until
/// the file is opened again, so the handle can be swapped (`recover`).
#[derive(Debug)]
pub(crate) struct RedbStorage {
    /// `None` while the file is being reopened (and until that succeeds).
    db: RwLock<Option<Arc<Database>>>,
    path: PathBuf,
}

/// What to do about a damaged file, said with every error that names one.
fn repair_hint(path: &Path) -> String {
    let dir = path.parent().unwrap_or(path).display();
    format!(
        "stop the server and run `dolores repair --data {dir}` (or move {} away to start empty)",
        path.display()
    )
}

fn corrupt(path: &Path, what: &str) -> EngineError {
    EngineError::Corrupt(format!(
        "the store file {} is damaged ({what}): {}",
        path.display(),
        repair_hint(path)
    ))
}

/// Opens (or creates) the file. redb checks and repairs a file that was not closed
/// cleanly as it opens; a file it cannot make sense of is an error that says so,
/// never a panic.
fn open_database(path: &Path) -> Result<Database> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        // redb would take an empty file for a new store: the messages it held are gone,
        // and starting empty must be a choice, not an accident.
        return Err(corrupt(path, "it is empty, 0 bytes"));
    }
    // A file that was there and cannot be read as a store is damaged (a torn header
    // reads short, a bad page fails its check); one that cannot be reached at all
    // (permissions, another process holding it) is not.
    let existed = std::fs::metadata(path).is_ok();
    let opened =
        std::panic::catch_unwind(|| Database::builder().set_cache_size(CACHE_BYTES).create(path));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(match storage_error(&e) {
            EngineError::Full(_) => {
                EngineError::Full(format!("cannot open {}: {e}", path.display()))
            }
            _ if existed && !is_access_problem(&e) => corrupt(path, &e.to_string()),
            _ => EngineError::Storage(format!("cannot open {}: {e}", path.display())),
        }),
        Err(panic) => Err(corrupt(path, &super::local::panic_text(&*panic))),
    }
}

/// Whether opening failed because the file could not be reached (permissions, another
/// process holding it), not because of what is in it.
fn is_access_problem(e: &redb::DatabaseError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    matches!(e, redb::DatabaseError::DatabaseAlreadyOpen)
        || text.contains("permission denied")
        || text.contains("read-only file system")
}

/// See `engine::check_embedded`.
pub(crate) fn check(dir: &Path, repair: bool) -> Result<bool> {
    let path = dir.join(FILE_NAME);
    if !path.exists() {
        return Err(EngineError::Storage(format!(
            "no store at {}",
            path.display()
        )));
    }
    let target = if repair {
        path.clone()
    } else {
        // Check a copy: redb repairs what it can while it checks.
        let copy = std::env::temp_dir().join(format!("dolores-check-{}.redb", std::process::id()));
        std::fs::copy(&path, &copy).map_err(|e| {
            EngineError::Storage(format!("cannot copy {} to check it: {e}", path.display()))
        })?;
        copy
    };
    let result = check_file(&path, &target);
    if !repair {
        let _ = std::fs::remove_file(&target);
    }
    result
}

/// Checks (and repairs) `target`, reporting as `path`.
fn check_file(path: &Path, target: &Path) -> Result<bool> {
    if std::fs::metadata(target).is_ok_and(|m| m.len() == 0) {
        return Err(corrupt(path, "it is empty, 0 bytes"));
    }
    let checked = std::panic::catch_unwind(|| -> std::result::Result<bool, String> {
        let mut db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .open(target)
            .map_err(|e| e.to_string())?;
        db.check_integrity().map_err(|e| e.to_string())
    });
    match checked {
        Ok(Ok(sound)) => Ok(sound),
        Ok(Err(e)) if e.contains("already open") => Err(EngineError::Storage(format!(
            "{} is in use: stop the server first ({e})",
            path.display()
        ))),
        Ok(Err(e)) => Err(corrupt(path, &e)),
        Err(panic) => Err(corrupt(path, &super::local::panic_text(&*panic))),
    }
}

/// Builds the `subscribed` index from the listeners for a store from before it (its
/// `meta` has no `subscribed_index`): once, as the store opens.
fn index_subscribed(txn: &WriteTransaction) -> Result<()> {
    let mut meta = txn.open_table(META).map_err(storage_error)?;
    if meta
        .get("subscribed_index")
        .map_err(storage_error)?
        .is_some()
    {
        return Ok(());
    }
    let listeners = txn.open_table(LISTENERS).map_err(storage_error)?;
    let mut subscribed = txn.open_table(SUBSCRIBED).map_err(storage_error)?;
    for entry in listeners.iter().map_err(storage_error)? {
        let (_, record) = entry.map_err(storage_error)?;
        // An unreadable record is expired by the clean-up, which reads no index.
        let Ok(listener) = serde_json::from_slice::<Listener>(record.value()) else {
            continue;
        };
        for sub in &listener.tracks {
            subscribed
                .insert((sub.track.as_str(), listener.uid.as_str()), ())
                .map_err(storage_error)?;
        }
    }
    meta.insert("subscribed_index", 1).map_err(storage_error)?;
    Ok(())
}

/// Drops the `subscribed` index and its mark from the store in `dir` (closed): the
/// shared suite's store from before the index.
#[cfg(test)]
pub(crate) fn forget_subscribed_index(dir: &Path) -> Result<()> {
    let db = open_database(&dir.join(FILE_NAME))?;
    let txn = db.begin_write().map_err(storage_error)?;
    txn.delete_table(SUBSCRIBED).map_err(storage_error)?;
    txn.open_table(META)
        .map_err(storage_error)?
        .remove("subscribed_index")
        .map_err(storage_error)?;
    txn.commit().map_err(storage_error)
}

impl RedbStorage {
    /// Opens or creates the store in `dir` (created if missing).
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| EngineError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let db = open_database(&path)?;
        let txn = db.begin_write().map_err(storage_error)?;
        {
            txn.open_table(LOG).map_err(storage_error)?;
            txn.open_table(BY_TRACK).map_err(storage_error)?;
            txn.open_table(LISTENERS).map_err(storage_error)?;
            txn.open_table(SUBSCRIBERS).map_err(storage_error)?;
            txn.open_table(META).map_err(storage_error)?;
            txn.open_table(KEYS).map_err(storage_error)?;
            txn.open_table(KEYS_BY_AGE).map_err(storage_error)?;
            // Created here for a store from before revocations, so reads find it.
            txn.open_table(REVOCATIONS).map_err(storage_error)?;
            index_subscribed(&txn)?;
        }
        txn.commit().map_err(storage_error)?;
        Ok(Self {
            db: RwLock::new(Some(Arc::new(db))),
            path,
        })
    }

    fn db(&self) -> Result<Arc<Database>> {
        let slot = match self.db.read() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        slot.clone().ok_or_else(|| {
            EngineError::Storage(format!(
                "{} is being reopened after a write failed",
                self.path.display()
            ))
        })
    }
}

impl Storage for RedbStorage {
    type Snap<'a> = ReadTransaction;
    type Txn<'a> = RedbTxn;

    fn read(&self) -> Result<ReadTransaction> {
        self.db()?.begin_read().map_err(storage_error)
    }

    fn write(&self) -> Result<RedbTxn> {
        Ok(RedbTxn(self.db()?.begin_write().map_err(storage_error)?))
    }

    fn corrupt(&self, what: &str) -> EngineError {
        corrupt(&self.path, what)
    }

    /// Opens the file again: the handle that saw the I/O error is closed first (redb
    /// holds a lock on the file), then redb checks and, if needed, repairs the file as
    /// at any start. Committed data is what a crash at that moment would have kept.
    fn recover(&self) -> Result<()> {
        let mut slot = match self.db.write() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Give the old handle up (reads fail with 503 meanwhile, never see an empty
        // store); a read still running holds it for a moment.
        let mut old = slot.take();
        for _ in 0..RECOVER_WAIT_TRIES {
            match old.take().map(Arc::try_unwrap) {
                Some(Ok(db)) => drop(db),
                Some(Err(still_shared)) => {
                    old = Some(still_shared);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
                None => {}
            }
            break;
        }
        drop(old);
        match open_database(&self.path) {
            Ok(db) => {
                *slot = Some(Arc::new(db));
                tracing::info!("reopened {}", self.path.display());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// The write transaction.
pub(crate) struct RedbTxn(WriteTransaction);

/// Opens a table for reading in either kind of transaction.
trait OpenTable {
    fn table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<K, V>,
    ) -> Result<impl ReadableTable<K, V> + '_>;
}

impl OpenTable for ReadTransaction {
    fn table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<K, V>,
    ) -> Result<impl ReadableTable<K, V> + '_> {
        self.open_table(def).map_err(storage_error)
    }
}

impl OpenTable for RedbTxn {
    fn table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<K, V>,
    ) -> Result<impl ReadableTable<K, V> + '_> {
        self.0.open_table(def).map_err(storage_error)
    }
}

/// Reads shared by the read and the write transaction (redb gives them different
/// table types with one `ReadableTable` trait).
macro_rules! snapshot_reads {
    () => {
        fn bounds(&self) -> Result<Bounds> {
            let meta = self.table(META)?;
            let get = |key| -> Result<u64> {
                Ok(meta
                    .get(key)
                    .map_err(storage_error)?
                    .map_or(0, |v| v.value()))
            };
            Ok(Bounds {
                head: get("head")?,
                trimmed_through: get("trimmed_through")?,
            })
        }

        fn listener(&self, uid: &str) -> Result<Option<Listener>> {
            let table = self.table(LISTENERS)?;
            let Some(record) = table.get(uid).map_err(storage_error)? else {
                return Ok(None);
            };
            serde_json::from_slice(record.value())
                .map(Some)
                .map_err(|e| EngineError::Storage(format!("listener {uid} unreadable: {e}")))
        }

        fn track_after(
            &self,
            track: &str,
            after: Position,
            limit: usize,
        ) -> Result<Vec<Arc<Message>>> {
            let index = self.table(BY_TRACK)?;
            let log = self.table(LOG)?;
            let track_name: Arc<str> = track.into();
            let mut messages = Vec::new();
            let Some(start) = after.checked_add(1) else {
                return Ok(messages);
            };
            for entry in index
                .range((track, start)..=(track, u64::MAX))
                .map_err(storage_error)?
                .take(limit)
            {
                let (key, _) = entry.map_err(storage_error)?;
                let pos = key.value().1;
                if let Some(row) = log.get(pos).map_err(storage_error)? {
                    let (time_ms, _, json) = row.value();
                    messages.push(Arc::new(Message::new(
                        pos,
                        track_name.clone(),
                        json.into(),
                        time_ms,
                    )));
                }
            }
            Ok(messages)
        }

        fn counts(&self) -> Result<StoreCounts> {
            Ok(StoreCounts {
                listeners: self.table(LISTENERS)?.len().map_err(storage_error)?,
                tracks: self.table(SUBSCRIBERS)?.len().map_err(storage_error)?,
                messages: self.table(LOG)?.len().map_err(storage_error)?,
            })
        }

        fn subscribers(
            &self,
            track: &str,
            after: &str,
            limit: usize,
        ) -> Result<(u64, Vec<String>)> {
            let count = self
                .table(SUBSCRIBERS)?
                .get(track)
                .map_err(storage_error)?
                .map_or(0, |v| v.value());
            let index = self.table(SUBSCRIBED)?;
            let mut page = Vec::new();
            let range = index.range((track, after)..).map_err(storage_error)?;
            for entry in range {
                let (key, _) = entry.map_err(storage_error)?;
                let (of, uid) = key.value();
                if of != track || page.len() >= limit {
                    break;
                }
                if uid != after {
                    page.push(uid.to_owned());
                }
            }
            Ok((count, page))
        }

        fn stale_listeners(&self, seen_before_ms: u64, limit: usize) -> Result<Vec<String>> {
            let table = self.table(LISTENERS)?;
            let mut stale = Vec::new();
            for entry in table.iter().map_err(storage_error)? {
                if stale.len() >= limit {
                    break;
                }
                let (uid, record) = entry.map_err(storage_error)?;
                // An unreadable record is stale too: nothing could ever use it.
                let seen = serde_json::from_slice::<Listener>(record.value())
                    .map_or(0, |l| l.last_seen_ms);
                if seen < seen_before_ms {
                    stale.push(uid.value().to_owned());
                }
            }
            Ok(stale)
        }

        fn revocation(&self, uid: &str) -> Result<Option<u64>> {
            let table = self.table(REVOCATIONS)?;
            let at = table.get(uid).map_err(storage_error)?;
            Ok(at.map(|v| v.value()))
        }

        fn old_revocations(&self, before_ms: u64, limit: usize) -> Result<Vec<String>> {
            let table = self.table(REVOCATIONS)?;
            let mut old = Vec::new();
            for entry in table.iter().map_err(storage_error)? {
                if old.len() >= limit {
                    break;
                }
                let (uid, at) = entry.map_err(storage_error)?;
                if at.value() < before_ms {
                    old.push(uid.value().to_owned());
                }
            }
            Ok(old)
        }
    };
}

impl Snapshot for ReadTransaction {
    snapshot_reads!();
}

impl Snapshot for RedbTxn {
    snapshot_reads!();
}

impl StorageTxn for RedbTxn {
    fn append(&mut self, message: &Arc<Message>) -> Result<()> {
        let mut log = self.0.open_table(LOG).map_err(storage_error)?;
        log.insert(
            message.pos,
            (message.time_ms, &*message.track, &*message.json),
        )
        .map_err(storage_error)?;
        let mut index = self.0.open_table(BY_TRACK).map_err(storage_error)?;
        index
            .insert((&*message.track, message.pos), ())
            .map_err(storage_error)?;
        Ok(())
    }

    fn oldest(&self) -> Result<Option<(Position, u64)>> {
        let log = self.0.open_table(LOG).map_err(storage_error)?;
        let first = log.first().map_err(storage_error)?;
        Ok(first.map(|(k, v)| (k.value(), v.value().0)))
    }

    fn delete_oldest(&mut self) -> Result<()> {
        let mut log = self.0.open_table(LOG).map_err(storage_error)?;
        let (pos, track) = match log.pop_first().map_err(storage_error)? {
            Some((pos, row)) => (pos.value(), row.value().1.to_owned()),
            None => return Ok(()),
        };
        drop(log);
        let mut index = self.0.open_table(BY_TRACK).map_err(storage_error)?;
        index.remove((track.as_str(), pos)).map_err(storage_error)?;
        Ok(())
    }

    fn put_listener(&mut self, listener: &Listener) -> Result<()> {
        let record = serde_json::to_vec(listener).map_err(storage_error)?;
        let mut table = self.0.open_table(LISTENERS).map_err(storage_error)?;
        table
            .insert(listener.uid.as_str(), record.as_slice())
            .map_err(storage_error)?;
        Ok(())
    }

    fn remove_listener(&mut self, uid: &str) -> Result<()> {
        let mut table = self.0.open_table(LISTENERS).map_err(storage_error)?;
        table.remove(uid).map_err(storage_error)?;
        Ok(())
    }

    fn put_revocation(&mut self, uid: &str, at_ms: u64) -> Result<()> {
        let mut table = self.0.open_table(REVOCATIONS).map_err(storage_error)?;
        table.insert(uid, at_ms).map_err(storage_error)?;
        Ok(())
    }

    fn remove_revocation(&mut self, uid: &str) -> Result<()> {
        let mut table = self.0.open_table(REVOCATIONS).map_err(storage_error)?;
        table.remove(uid).map_err(storage_error)?;
        Ok(())
    }

    fn set_subscribed(&mut self, track: &str, uid: &str, subscribed: bool) -> Result<()> {
        let mut index = self.0.open_table(SUBSCRIBED).map_err(storage_error)?;
        let delta = if subscribed {
            index.insert((track, uid), ()).map_err(storage_error)?;
            1
        } else {
            index.remove((track, uid)).map_err(storage_error)?;
            -1
        };
        drop(index);
        let mut table = self.0.open_table(SUBSCRIBERS).map_err(storage_error)?;
        let count = table
            .get(track)
            .map_err(storage_error)?
            .map_or(0, |v| v.value())
            .saturating_add_signed(delta);
        if count == 0 {
            table.remove(track).map_err(storage_error)?;
        } else {
            table.insert(track, count).map_err(storage_error)?;
        }
        Ok(())
    }

    fn set_bounds(&mut self, bounds: Bounds) -> Result<()> {
        let mut meta = self.0.open_table(META).map_err(storage_error)?;
        meta.insert("head", bounds.head).map_err(storage_error)?;
        meta.insert("trimmed_through", bounds.trimmed_through)
            .map_err(storage_error)?;
        Ok(())
    }

    fn idempotency_key(&self, key: &str) -> Result<Option<KeyRecord>> {
        let keys = self.0.open_table(KEYS).map_err(storage_error)?;
        let found = keys.get(key).map_err(storage_error)?;
        Ok(found.map(|row| {
            let (time_ms, digest, first, count) = row.value();
            KeyRecord {
                time_ms,
                digest: digest.to_owned(),
                first,
                count,
            }
        }))
    }

    fn put_idempotency_key(&mut self, key: &str, record: &KeyRecord) -> Result<()> {
        let mut keys = self.0.open_table(KEYS).map_err(storage_error)?;
        let row = (
            record.time_ms,
            record.digest.as_str(),
            record.first,
            record.count,
        );
        keys.insert(key, row).map_err(storage_error)?;
        let mut by_age = self.0.open_table(KEYS_BY_AGE).map_err(storage_error)?;
        by_age
            .insert((record.time_ms, key), ())
            .map_err(storage_error)?;
        Ok(())
    }

    fn expire_idempotency_keys(&mut self, before_ms: u64, limit: usize) -> Result<usize> {
        let mut by_age = self.0.open_table(KEYS_BY_AGE).map_err(storage_error)?;
        let mut expired = Vec::new();
        for entry in by_age
            .range((0, "")..(before_ms, ""))
            .map_err(storage_error)?
            .take(limit)
        {
            let (age_key, _) = entry.map_err(storage_error)?;
            let (time, key) = age_key.value();
            expired.push((time, key.to_owned()));
        }
        let mut keys = self.0.open_table(KEYS).map_err(storage_error)?;
        for (time, key) in &expired {
            by_age
                .remove((*time, key.as_str()))
                .map_err(storage_error)?;
            keys.remove(key.as_str()).map_err(storage_error)?;
        }
        Ok(expired.len())
    }

    fn commit(self) -> Result<()> {
        self.0.commit().map_err(storage_error)
    }
}

/// What a store from before the segment log kept in its own tables: the log's bounds,
/// its messages (position, time, track, JSON) and its idempotency keys. Read once, to
/// move them into the log (`logstore`).
#[derive(Debug, Default)]
pub(crate) struct OldLog {
    /// The log's bounds.
    pub bounds: Bounds,
    /// The messages, in order.
    pub messages: Vec<(Position, u64, String, String)>,
    /// The idempotency keys.
    pub keys: Vec<(String, KeyRecord)>,
}

impl RedbStorage {
    /// The messages, bounds and keys a store from before the segment log kept in this
    /// file; `None` when it has none.
    pub(crate) fn old_log(&self) -> Result<Option<OldLog>> {
        let txn = self.read()?;
        let bounds = Snapshot::bounds(&txn)?;
        let log = txn.table(LOG)?;
        let keys = txn.table(KEYS)?;
        if bounds == Bounds::default()
            && log.is_empty().map_err(storage_error)?
            && keys.is_empty().map_err(storage_error)?
        {
            return Ok(None);
        }
        let mut old = OldLog {
            bounds,
            ..OldLog::default()
        };
        for row in log.iter().map_err(storage_error)? {
            let (pos, row) = row.map_err(storage_error)?;
            let (time_ms, track, json) = row.value();
            old.messages
                .push((pos.value(), time_ms, track.to_owned(), json.to_owned()));
        }
        for row in keys.iter().map_err(storage_error)? {
            let (key, row) = row.map_err(storage_error)?;
            let (time_ms, digest, first, count) = row.value();
            let record = KeyRecord {
                time_ms,
                digest: digest.to_owned(),
                first,
                count,
            };
            old.keys.push((key.value().to_owned(), record));
        }
        Ok(Some(old))
    }

    /// Empties the message tables of a store from before the segment log, once the log
    /// holds what they held (a no-op, without a commit, when they are empty).
    pub(crate) fn forget_old_log(&self) -> Result<()> {
        let empty = {
            let txn = self.read()?;
            Snapshot::bounds(&txn)? == Bounds::default()
                && txn.table(LOG)?.is_empty().map_err(storage_error)?
                && txn.table(KEYS)?.is_empty().map_err(storage_error)?
        };
        if empty {
            return Ok(());
        }
        let txn = self.db()?.begin_write().map_err(storage_error)?;
        txn.delete_table(LOG).map_err(storage_error)?;
        txn.delete_table(BY_TRACK).map_err(storage_error)?;
        txn.delete_table(KEYS).map_err(storage_error)?;
        txn.delete_table(KEYS_BY_AGE).map_err(storage_error)?;
        {
            let mut meta = txn.open_table(META).map_err(storage_error)?;
            meta.remove("head").map_err(storage_error)?;
            meta.remove("trimmed_through").map_err(storage_error)?;
            txn.open_table(LOG).map_err(storage_error)?;
            txn.open_table(BY_TRACK).map_err(storage_error)?;
            txn.open_table(KEYS).map_err(storage_error)?;
            txn.open_table(KEYS_BY_AGE).map_err(storage_error)?;
        }
        txn.commit().map_err(storage_error)
    }

    /// Writes messages into this file's own tables, as a store from before the segment
    /// log did (the migration test's old store).
    #[cfg(test)]
    pub(crate) fn write_old_log(&self, messages: &[Arc<Message>]) -> Result<()> {
        let mut txn = self.write()?;
        let mut bounds = Snapshot::bounds(&txn)?;
        for message in messages {
            txn.append(message)?;
            bounds.head = message.pos;
        }
        txn.set_bounds(bounds)?;
        txn.commit()
    }
}
