//! The in-memory storage (`--memory`): the same rules as the durable one, nothing on
//! disk. Good for development, tests, and deployments that accept losing queues on a
//! restart.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::local::{Bounds, Snapshot, Storage, StorageTxn};
use super::{EngineError, Listener, Message, Position, Result, StoreCounts};

/// Everything, behind one lock. The writer holds it for a commit; readers for a read.
#[derive(Debug, Default)]
pub(crate) struct MemoryStorage {
    state: Mutex<MemState>,
}

#[derive(Debug, Default)]
pub(crate) struct MemState {
    /// Positions `trimmed_through + 1 ..= head`, in order.
    log: VecDeque<Arc<Message>>,
    /// Each track's positions, in order.
    by_track: HashMap<Arc<str>, VecDeque<Position>>,
    listeners: HashMap<String, Listener>,
    /// Track → its subscribers' uids, in order.
    subscribers: HashMap<String, BTreeSet<String>>,
    /// uid → when its tokens were revoked (ms).
    revocations: HashMap<String, u64>,
    bounds: Bounds,
}

/// A locked view: serves as both snapshot and transaction.
pub(crate) struct MemView<'a>(MutexGuard<'a, MemState>);

impl MemoryStorage {
    fn lock(&self) -> Result<MemView<'_>> {
        self.state
            .lock()
            .map(MemView)
            .map_err(|_| EngineError::Storage("memory store lock poisoned".into()))
    }
}

impl Storage for MemoryStorage {
    type Snap<'a> = MemView<'a>;
    type Txn<'a> = MemView<'a>;

    fn read(&self) -> Result<MemView<'_>> {
        self.lock()
    }

    fn write(&self) -> Result<MemView<'_>> {
        self.lock()
    }
}

impl Snapshot for MemView<'_> {
    fn bounds(&self) -> Result<Bounds> {
        Ok(self.0.bounds)
    }

    fn listener(&self, uid: &str) -> Result<Option<Listener>> {
        Ok(self.0.listeners.get(uid).cloned())
    }

    fn track_after(&self, track: &str, after: Position, limit: usize) -> Result<Vec<Arc<Message>>> {
        let Some(positions) = self.0.by_track.get(track) else {
            return Ok(Vec::new());
        };
        let first = positions.partition_point(|&p| p <= after);
        let base = self.0.bounds.trimmed_through + 1;
        Ok(positions
            .range(first..)
            .take(limit)
            .filter_map(|&p| self.0.log.get((p - base) as usize).cloned())
            .collect())
    }

    fn counts(&self) -> Result<StoreCounts> {
        Ok(StoreCounts {
            listeners: self.0.listeners.len() as u64,
            tracks: self.0.subscribers.len() as u64,
            messages: self.0.log.len() as u64,
        })
    }

    fn subscribers(&self, track: &str, after: &str, limit: usize) -> Result<(u64, Vec<String>)> {
        let Some(uids) = self.0.subscribers.get(track) else {
            return Ok((0, Vec::new()));
        };
        let page = uids
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect();
        Ok((uids.len() as u64, page))
    }

    fn stale_listeners(&self, seen_before_ms: u64, limit: usize) -> Result<Vec<String>> {
        Ok(self
            .0
            .listeners
            .values()
            .filter(|l| l.last_seen_ms < seen_before_ms)
            .take(limit)
            .map(|l| l.uid.clone())
            .collect())
    }

    fn revocation(&self, uid: &str) -> Result<Option<u64>> {
        Ok(self.0.revocations.get(uid).copied())
    }

    fn old_revocations(&self, before_ms: u64, limit: usize) -> Result<Vec<String>> {
        Ok(self
            .0
            .revocations
            .iter()
            .filter(|&(_, &at)| at < before_ms)
            .take(limit)
            .map(|(uid, _)| uid.clone())
            .collect())
    }
}

impl StorageTxn for MemView<'_> {
    fn append(&mut self, message: &Arc<Message>) -> Result<()> {
        let message = message.clone();
        self.0
            .by_track
            .entry(message.track.clone())
            .or_default()
            .push_back(message.pos);
        self.0.log.push_back(message);
        Ok(())
    }

    fn oldest(&self) -> Result<Option<(Position, u64)>> {
        Ok(self.0.log.front().map(|m| (m.pos, m.time_ms)))
    }

    fn delete_oldest(&mut self) -> Result<()> {
        let state = &mut *self.0;
        if let Some(message) = state.log.pop_front()
            && let Some(positions) = state.by_track.get_mut(&message.track)
        {
            positions.pop_front();
            if positions.is_empty() {
                state.by_track.remove(&message.track);
            }
        }
        Ok(())
    }

    fn put_listener(&mut self, listener: &Listener) -> Result<()> {
        self.0
            .listeners
            .insert(listener.uid.clone(), listener.clone());
        Ok(())
    }

    fn remove_listener(&mut self, uid: &str) -> Result<()> {
        self.0.listeners.remove(uid);
        Ok(())
    }

    fn put_revocation(&mut self, uid: &str, at_ms: u64) -> Result<()> {
        self.0.revocations.insert(uid.to_owned(), at_ms);
        Ok(())
    }

    fn remove_revocation(&mut self, uid: &str) -> Result<()> {
        self.0.revocations.remove(uid);
        Ok(())
    }

    fn set_subscribed(&mut self, track: &str, uid: &str, subscribed: bool) -> Result<()> {
        if subscribed {
            self.0
                .subscribers
                .entry(track.to_owned())
                .or_default()
                .insert(uid.to_owned());
        } else if let Some(uids) = self.0.subscribers.get_mut(track) {
            uids.remove(uid);
            if uids.is_empty() {
                self.0.subscribers.remove(track);
            }
        }
        Ok(())
    }

    fn set_bounds(&mut self, bounds: Bounds) -> Result<()> {
        self.0.bounds = bounds;
        Ok(())
    }

    fn commit(self) -> Result<()> {
        Ok(())
    }
}
