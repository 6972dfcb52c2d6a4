//! The outbox: webhook events written before they are sent, removed once the app has
//! them. [`Outbox`] is the seam; `memory` is here, the durable ones are `embedded` (a
//! redb file of its own in the data dir) and `redis` (a Stream every node shares).
//!
//! Every outbox keeps at most a bound of events: past it the oldest go, and `push` says
//! how many, so an app that is down for a day cannot fill the disk.
//!
//! The embedded outbox also keeps who stands reported online (see
//! [`Outbox::reported_at_open`]): a single node's presence, restarted after a crash,
//! reports them gone if they do not come back.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::Kind;

/// An event's place in the outbox: later events have higher sequence numbers, which
/// never repeat within an outbox.
pub(crate) type Seq = u64;

/// What can go wrong in an outbox.
#[derive(Debug, Clone, thiserror::Error)]
#[error("webhook outbox: {0}")]
pub(crate) struct OutboxError(pub(crate) String);

/// Shortens `Result<T, OutboxError>`.
pub(crate) type Result<T> = std::result::Result<T, OutboxError>;

/// An event to write: its lane (the events of one lane are sent one after the other,
/// in order) and its JSON body, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// `l:{uid}` for a listener's events, `t:{track}` for a track's.
    pub(crate) lane: String,
    /// The request body.
    pub(crate) body: String,
}

/// An event to append: the entry as it is sent, and what it says of its lane's subject
/// (an outbox that keeps who stands reported online reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Staged {
    /// What happened.
    pub(crate) kind: Kind,
    /// The event.
    pub(crate) entry: Entry,
}

/// Who stands reported online: the uids whose last event was `listener.online` and the
/// tracks whose last was `track.occupied`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Reported {
    /// The listeners.
    pub(crate) uids: Vec<String>,
    /// The tracks.
    pub(crate) tracks: Vec<String>,
}

/// An event as the outbox keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    /// Its place.
    pub(crate) seq: Seq,
    /// The event.
    pub(crate) entry: Entry,
}

/// Where events wait until the app has them.
#[async_trait::async_trait]
pub(crate) trait Outbox: Send + Sync + std::fmt::Debug + 'static {
    /// Appends `entries` in order, durably as the outbox promises, then drops the
    /// oldest events past the bound; returns how many were dropped.
    async fn push(&self, entries: Vec<Staged>) -> Result<u64>;
    /// Up to `limit` events after `after`, oldest first.
    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<Stored>>;
    /// Forgets events the app has (an event already gone is no error).
    async fn remove(&self, seqs: Vec<Seq>) -> Result<()>;
    /// How many events wait.
    async fn len(&self) -> Result<u64>;
    /// Whether the event is still there: not sent, nor dropped past the bound.
    async fn contains(&self, seq: Seq) -> Result<bool>;
    /// Whether this node is the one that sends now; called about once a second, and
    /// renews what it holds. One node alone has the outbox unless it is shared.
    async fn lease(&self) -> Result<bool> {
        Ok(true)
    }
    /// Lets go of the lease at shutdown, so another node takes over at once.
    async fn release(&self) {}
    /// Who stood reported online when the outbox was opened: after a crash, those the
    /// previous run reported online and never gone. Only a durable outbox of one node
    /// keeps it (in memory a restart forgets everyone anyway; on Redis, presence keeps
    /// its own).
    fn reported_at_open(&self) -> Reported {
        Reported::default()
    }
}

/// The outbox of `--memory`: lost with the process, like everything else there.
#[derive(Debug)]
pub(crate) struct MemoryOutbox {
    max: u64,
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    events: BTreeMap<Seq, Entry>,
    last: Seq,
}

impl MemoryOutbox {
    /// An empty outbox keeping at most `max` events.
    pub(crate) fn new(max: u64) -> Self {
        Self {
            max,
            inner: Mutex::default(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Outbox for MemoryOutbox {
    async fn push(&self, entries: Vec<Staged>) -> Result<u64> {
        let mut inner = self.inner();
        for Staged { entry, .. } in entries {
            inner.last += 1;
            let seq = inner.last;
            inner.events.insert(seq, entry);
        }
        let mut dropped = 0;
        while inner.events.len() as u64 > self.max {
            inner.events.pop_first();
            dropped += 1;
        }
        Ok(dropped)
    }

    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<Stored>> {
        let inner = self.inner();
        Ok(inner
            .events
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(seq, entry)| Stored {
                seq: *seq,
                entry: entry.clone(),
            })
            .collect())
    }

    async fn remove(&self, seqs: Vec<Seq>) -> Result<()> {
        let mut inner = self.inner();
        for seq in seqs {
            inner.events.remove(&seq);
        }
        Ok(())
    }

    async fn len(&self) -> Result<u64> {
        Ok(self.inner().events.len() as u64)
    }

    async fn contains(&self, seq: Seq) -> Result<bool> {
        Ok(self.inner().events.contains_key(&seq))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! One suite every outbox passes.

    use super::*;

    fn entry(lane: &str, n: u32) -> Staged {
        let kind = if lane.starts_with("l:") {
            Kind::ListenerOnline
        } else {
            Kind::TrackOccupied
        };
        Staged {
            kind,
            entry: Entry {
                lane: lane.into(),
                body: format!("{{\"n\":{n}}}"),
            },
        }
    }

    /// Order, removal, and the bound dropping the oldest.
    pub(crate) async fn suite(outbox: &dyn Outbox, max: u64) {
        assert_eq!(outbox.len().await.expect("len"), 0);
        let dropped = outbox
            .push(vec![entry("l:a", 1), entry("l:b", 2), entry("l:a", 3)])
            .await
            .expect("push");
        assert_eq!(dropped, 0);
        let all = outbox.read(0, 10).await.expect("read");
        let bodies: Vec<_> = all.iter().map(|s| s.entry.body.as_str()).collect();
        assert_eq!(bodies, ["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "{all:?}");
        let after_first = outbox.read(all[0].seq, 1).await.expect("read");
        assert_eq!(after_first, vec![all[1].clone()]);
        assert!(outbox.contains(all[1].seq).await.expect("contains"));

        outbox
            .remove(vec![all[1].seq, all[1].seq + 1000])
            .await
            .expect("remove");
        assert_eq!(outbox.len().await.expect("len"), 2);
        assert!(!outbox.contains(all[1].seq).await.expect("contains"));
        outbox
            .remove(vec![all[0].seq, all[2].seq])
            .await
            .expect("remove");
        assert_eq!(outbox.len().await.expect("len"), 0);

        // Emptied, it still never hands out a sequence number twice.
        outbox.push(vec![entry("l:a", 4)]).await.expect("push");
        let again = outbox.read(0, 10).await.expect("read");
        assert!(again[0].seq > all[2].seq, "{again:?} after {all:?}");
        outbox.remove(vec![again[0].seq]).await.expect("remove");

        // Past the bound, the oldest go.
        let over: Vec<_> = (0..max as u32 + 3).map(|n| entry("t:x", 100 + n)).collect();
        let dropped = outbox.push(over).await.expect("push");
        assert_eq!(dropped, 3);
        assert_eq!(outbox.len().await.expect("len"), max);
        let kept = outbox.read(0, max as usize + 10).await.expect("read");
        assert_eq!(kept[0].entry.body, "{\"n\":103}");
        assert_eq!(kept.len() as u64, max);
        assert!(!outbox.contains(kept[0].seq - 1).await.expect("contains"));
    }

    #[tokio::test]
    async fn the_memory_outbox_passes_the_suite() {
        suite(&MemoryOutbox::new(5), 5).await;
    }
}
