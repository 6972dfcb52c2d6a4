//! Deliveries recorded but not yet written: the one set of rules every engine follows
//! for its lazily written cursors.
//!
//! Streams ack every chunk they write, far too often to write each ack; an engine
//! writes them in batches (once a tick, and on close). Until an ack's write has
//! committed, the store still holds the older cursor, so:
//!
//! - a flush takes a [`PendingAcks::snapshot`] and leaves the acks in place;
//! - once its write has committed, [`PendingAcks::forget_written`] drops only the
//!   entries that did not advance meanwhile (a failed write forgets nothing, so the
//!   next flush tries again);
//! - every read of a listener's cursor goes through [`PendingAcks::merged`], which
//!   looks at the pending acks before and after it reads the store.
//!
//! So a stream opened without a cursor while a flush is in flight starts from the
//! newest cursor, never from the older one the store still holds. This module never
//! touches a store itself.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Listener, Position, Result, now_ms};

/// One listener's pending delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ack {
    /// How far it was delivered; never goes back.
    pub(crate) cursor: Position,
    /// When it was last delivered to or seen (ms since the Unix epoch).
    pub(crate) seen_ms: u64,
}

impl Ack {
    /// Moves `listener` forward to this ack; nothing goes back.
    pub(crate) fn apply_to(self, listener: &mut Listener) {
        listener.cursor = listener.cursor.max(self.cursor);
        listener.last_seen_ms = listener.last_seen_ms.max(self.seen_ms);
    }
}

/// Acks recorded and not yet written: uid → [`Ack`]. See the module docs.
#[derive(Debug, Default)]
pub(crate) struct PendingAcks {
    acks: Mutex<HashMap<String, Ack>>,
    /// A test's hold on the next flush, between its snapshot and its write.
    #[cfg(test)]
    hold: Mutex<Option<std::sync::Arc<hold::FlushHold>>>,
}

impl PendingAcks {
    /// Records that `uid` was delivered up to `pos` now; the cursor never goes back.
    /// Called per written chunk per stream, so it allocates nothing for a uid already
    /// pending.
    pub(crate) fn record(&self, uid: &str, pos: Position) {
        let now = now_ms();
        if let Ok(mut acks) = self.acks.lock() {
            match acks.get_mut(uid) {
                Some(ack) => {
                    ack.cursor = ack.cursor.max(pos);
                    ack.seen_ms = now;
                }
                None => {
                    acks.insert(
                        uid.to_owned(),
                        Ack {
                            cursor: pos,
                            seen_ms: now,
                        },
                    );
                }
            }
        }
    }

    /// The pending ack of `uid`, if any.
    pub(crate) fn get(&self, uid: &str) -> Option<Ack> {
        self.acks
            .lock()
            .ok()
            .and_then(|acks| acks.get(uid).copied())
    }

    /// What a flush should write: every pending ack, left in place until
    /// [`Self::forget_written`] (see the module docs).
    pub(crate) fn snapshot(&self) -> Vec<(String, Ack)> {
        let snapshot: Vec<(String, Ack)> = match self.acks.lock() {
            Ok(acks) => acks.iter().map(|(uid, ack)| (uid.clone(), *ack)).collect(),
            Err(_) => Vec::new(),
        };
        #[cfg(test)]
        if !snapshot.is_empty()
            && let Some(hold) = self.hold.lock().ok().and_then(|mut h| h.take())
        {
            hold.hold();
        }
        snapshot
    }

    /// After the write of `written` (entries of a [`Self::snapshot`]) committed: drops
    /// each entry unless it advanced since the snapshot.
    pub(crate) fn forget_written<'a>(&self, written: impl IntoIterator<Item = &'a (String, Ack)>) {
        if let Ok(mut acks) = self.acks.lock() {
            for (uid, ack) in written {
                if acks.get(uid) == Some(ack) {
                    acks.remove(uid);
                }
            }
        }
    }

    /// Reads a listener from the store with `read`, then moves its cursor to the pending
    /// ack. The ack is looked at before the read as well as after: a flush may commit it
    /// (and forget it) while the store is being read.
    pub(crate) async fn merged(
        &self,
        uid: &str,
        read: impl Future<Output = Result<Option<Listener>>>,
    ) -> Result<Option<Listener>> {
        let before = self.get(uid);
        let mut found = read.await?;
        if let Some(listener) = found.as_mut() {
            for ack in [before, self.get(uid)].into_iter().flatten() {
                ack.apply_to(listener);
            }
        }
        Ok(found)
    }

    /// Makes the next flush that has something to write stop right after its snapshot,
    /// until the returned hold is released or dropped: the shared suite reads the
    /// engine while a flush is in flight.
    #[cfg(test)]
    pub(crate) fn hold_next_flush(&self) -> hold::HeldFlush {
        let flush = std::sync::Arc::new(hold::FlushHold::default());
        if let Ok(mut slot) = self.hold.lock() {
            *slot = Some(flush.clone());
        }
        hold::HeldFlush(flush)
    }
}

/// The test-only hold on a flush (see [`PendingAcks::hold_next_flush`]).
#[cfg(test)]
pub(crate) mod hold {
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    /// Where a held flush is.
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    enum State {
        #[default]
        Armed,
        Holding,
        Released,
    }

    /// Shared by the flush it stops and the test that holds it.
    #[derive(Debug, Default)]
    pub(crate) struct FlushHold {
        state: Mutex<State>,
        changed: Condvar,
    }

    impl FlushHold {
        /// Called by the flush: waits until released. The Redis engine flushes on a
        /// Tokio worker of a multi-threaded runtime, which must hand its other tasks
        /// over before it blocks; the local writer is a thread of its own.
        pub(super) fn hold(&self) {
            let wait = || {
                let Ok(mut state) = self.state.lock() else {
                    return;
                };
                if *state == State::Armed {
                    *state = State::Holding;
                }
                while *state == State::Holding {
                    match self.changed.wait(state) {
                        Ok(next) => state = next,
                        Err(_) => return,
                    }
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(wait);
                }
                _ => wait(),
            }
        }

        fn state(&self) -> State {
            self.state.lock().map_or(State::Released, |s| *s)
        }

        fn release(&self) {
            if let Ok(mut state) = self.state.lock() {
                *state = State::Released;
            }
            self.changed.notify_all();
        }
    }

    /// The test's end of a hold; dropping it releases the flush.
    #[derive(Debug)]
    pub(crate) struct HeldFlush(pub(super) Arc<FlushHold>);

    impl HeldFlush {
        /// Waits (up to `within`) until a flush has taken its snapshot and stopped;
        /// panics if none did.
        pub(crate) async fn until_holding(&self, within: Duration) {
            let deadline = tokio::time::Instant::now() + within;
            while self.0.state() != State::Holding {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no flush started within {within:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    impl Drop for HeldFlush {
        fn drop(&mut self) {
            self.0.release();
        }
    }
}
