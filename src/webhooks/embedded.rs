//! The durable outbox of the embedded engine: a redb file of its own, `webhooks.redb`
//! in the data dir, beside the store's. A file of its own keeps the engine's seam as
//! it is and lets webhook writes never wait for the store's writer (nor it for them).
//!
//! Tables: `outbox` (sequence number → (lane, body)), `meta` (`last`: the last
//! sequence number handed out, so numbers never repeat once the outbox empties) and
//! `reported` (the lanes — `l:{uid}`, `t:{track}` — whose last event said online /
//! occupied). `reported` is written in the same transaction that appends the events, so
//! it never disagrees with what will be sent; it is read once, at open, so that after a
//! `kill -9` presence reports those gone unless they come back (`presence::local`). It
//! holds at most who is reported online: an offline or vacated removes the lane.
//! Every write is synced before it returns (redb's default durability); redb calls run
//! on the blocking pool, never on the runtime's threads.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::Kind;
use super::outbox::{Entry, Outbox, OutboxError, Reported, Result, Seq, Staged, Stored};

const OUTBOX: TableDefinition<u64, (&str, &str)> = TableDefinition::new("outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REPORTED: TableDefinition<&str, ()> = TableDefinition::new("reported");

/// The lane prefixes of a listener's and a track's events (see `Webhooks::emit`).
const LISTENER_LANE: &str = "l:";
const TRACK_LANE: &str = "t:";

/// The file's name inside the data dir.
pub(crate) const FILE_NAME: &str = "webhooks.redb";

/// redb's page cache for this file: the outbox is read front to back once, so a small
/// cache does (redb's default would be 1 GiB).
const CACHE_BYTES: usize = 4 * 1024 * 1024;

fn error(e: impl std::fmt::Display) -> OutboxError {
    OutboxError(e.to_string())
}

/// The outbox in `webhooks.redb`.
#[derive(Debug, Clone)]
pub(crate) struct RedbOutbox {
    db: Arc<Database>,
    max: u64,
    /// Who stood reported online when the file was opened.
    reported_at_open: Reported,
}

impl RedbOutbox {
    /// Opens (or creates) the outbox in `dir`, keeping at most `max` events.
    pub(crate) fn open(dir: &Path, max: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| OutboxError(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| OutboxError(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(error)?;
        let mut reported_at_open = Reported::default();
        {
            txn.open_table(OUTBOX).map_err(error)?;
            txn.open_table(META).map_err(error)?;
            let reported = txn.open_table(REPORTED).map_err(error)?;
            for item in reported.iter().map_err(error)? {
                let (lane, _) = item.map_err(error)?;
                let lane = lane.value();
                if let Some(uid) = lane.strip_prefix(LISTENER_LANE) {
                    reported_at_open.uids.push(uid.to_owned());
                } else if let Some(track) = lane.strip_prefix(TRACK_LANE) {
                    reported_at_open.tracks.push(track.to_owned());
                }
            }
        }
        txn.commit().map_err(error)?;
        Ok(Self {
            db: Arc::new(db),
            max,
            reported_at_open,
        })
    }

    /// Runs `work` on the blocking pool: redb syncs to disk.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database, u64) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (db, max) = (self.db.clone(), self.max);
        tokio::task::spawn_blocking(move || work(&db, max))
            .await
            .map_err(|e| OutboxError(format!("the outbox task failed: {e}")))?
    }
}

#[async_trait::async_trait]
impl Outbox for RedbOutbox {
    async fn push(&self, entries: Vec<Staged>) -> Result<u64> {
        self.blocking(move |db, max| {
            let txn = db.begin_write().map_err(error)?;
            let mut dropped = 0;
            {
                let mut meta = txn.open_table(META).map_err(error)?;
                let mut last = meta.get("last").map_err(error)?.map_or(0, |v| v.value());
                let mut outbox = txn.open_table(OUTBOX).map_err(error)?;
                let mut reported = txn.open_table(REPORTED).map_err(error)?;
                for Staged { kind, entry } in &entries {
                    last += 1;
                    outbox
                        .insert(last, (entry.lane.as_str(), entry.body.as_str()))
                        .map_err(error)?;
                    match kind {
                        Kind::ListenerOnline | Kind::TrackOccupied => {
                            reported.insert(entry.lane.as_str(), ()).map_err(error)?;
                        }
                        Kind::ListenerOffline | Kind::TrackVacated => {
                            reported.remove(entry.lane.as_str()).map_err(error)?;
                        }
                    }
                }
                meta.insert("last", last).map_err(error)?;
                let len = outbox.len().map_err(error)?;
                for _ in max..len {
                    if outbox.pop_first().map_err(error)?.is_none() {
                        break;
                    }
                    dropped += 1;
                }
            }
            txn.commit().map_err(error)?;
            Ok(dropped)
        })
        .await
    }

    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<Stored>> {
        self.blocking(move |db, _| {
            let txn = db.begin_read().map_err(error)?;
            let outbox = txn.open_table(OUTBOX).map_err(error)?;
            let mut events = Vec::new();
            for item in outbox
                .range(after.saturating_add(1)..)
                .map_err(error)?
                .take(limit)
            {
                let (seq, value) = item.map_err(error)?;
                let (lane, body) = value.value();
                events.push(Stored {
                    seq: seq.value(),
                    entry: Entry {
                        lane: lane.to_owned(),
                        body: body.to_owned(),
                    },
                });
            }
            Ok(events)
        })
        .await
    }

    async fn remove(&self, seqs: Vec<Seq>) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.blocking(move |db, _| {
            let txn = db.begin_write().map_err(error)?;
            {
                let mut outbox = txn.open_table(OUTBOX).map_err(error)?;
                for seq in seqs {
                    outbox.remove(seq).map_err(error)?;
                }
            }
            txn.commit().map_err(error)
        })
        .await
    }

    async fn contains(&self, seq: Seq) -> Result<bool> {
        self.blocking(move |db, _| {
            let txn = db.begin_read().map_err(error)?;
            let outbox = txn.open_table(OUTBOX).map_err(error)?;
            Ok(outbox.get(seq).map_err(error)?.is_some())
        })
        .await
    }

    async fn len(&self) -> Result<u64> {
        self.blocking(|db, _| {
            let txn = db.begin_read().map_err(error)?;
            txn.open_table(OUTBOX).map_err(error)?.len().map_err(error)
        })
        .await
    }

    fn reported_at_open(&self) -> Reported {
        self.reported_at_open.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_redb_outbox_passes_the_suite_and_keeps_events_across_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = RedbOutbox::open(dir.path(), 5).expect("open");
        super::super::outbox::tests::suite(&outbox, 5).await;
        let before = outbox.read(0, 10).await.expect("read");
        drop(outbox);
        let reopened = RedbOutbox::open(dir.path(), 5).expect("reopen");
        assert_eq!(reopened.read(0, 10).await.expect("read"), before);
    }

    fn staged(kind: Kind, lane: &str) -> Staged {
        Staged {
            kind,
            entry: Entry {
                lane: lane.into(),
                body: "{}".into(),
            },
        }
    }

    #[tokio::test]
    async fn the_redb_outbox_keeps_who_stands_reported_online_across_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = RedbOutbox::open(dir.path(), 2).expect("open");
        assert_eq!(outbox.reported_at_open(), Reported::default());
        outbox
            .push(vec![
                staged(Kind::ListenerOnline, "l:a"),
                staged(Kind::TrackOccupied, "t:rooms/1"),
                staged(Kind::ListenerOnline, "l:b"),
                staged(Kind::TrackOccupied, "t:rooms/2"),
            ])
            .await
            .expect("push");
        // Sent and removed, or dropped past the bound: still reported online.
        let all = outbox.read(0, 10).await.expect("read");
        outbox
            .remove(all.iter().map(|s| s.seq).collect())
            .await
            .expect("remove");
        outbox
            .push(vec![
                staged(Kind::ListenerOffline, "l:a"),
                staged(Kind::TrackVacated, "t:rooms/2"),
            ])
            .await
            .expect("push");
        drop(outbox);
        let reopened = RedbOutbox::open(dir.path(), 2).expect("reopen");
        assert_eq!(
            reopened.reported_at_open(),
            Reported {
                uids: vec!["b".into()],
                tracks: vec!["rooms/1".into()],
            }
        );
    }
}
