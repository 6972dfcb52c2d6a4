//! This node's live fan-out: which open streams want which track, and a bounded queue
//! per stream.
//!
//! The hub hears every committed change from the engine, in commit order (it is the
//! engine's [`Tail`]), and pushes each stored message into the queue of every stream
//! subscribed to its track. It never blocks and never waits for a stream: a queue that
//! is full is emptied and marked *lagged*, and its stream catches up from the store by
//! its cursor — nothing is skipped, and a reader that does not read costs at most one
//! full queue. It knows nothing of storage or HTTP.
//!
//! It also notes, for `presence`, each uid and track whose "has an open stream on this
//! node" may have turned (a first stream opened, a last one closed): presence looks at
//! those only, so it costs nothing per message.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::engine::{Change, Message, Tail};

/// Most messages waiting for one stream. Past this the stream is behind by more than a
/// burst and reads from the store instead; the queue holds pointers to shared
/// messages, so a full one costs 8 bytes a message.
pub(crate) const QUEUE_CAPACITY: usize = 4096;
/// Most bytes of messages (their JSON) waiting for one stream. The messages are shared,
/// but a stream that does not read keeps alive every one in its queue: 4,096 messages of
/// 64 KiB would be 256 MiB for one stuck reader. Past this it reads from the store too.
pub(crate) const QUEUE_BYTES: usize = 1024 * 1024;

/// The live fan-out. Share it as `Arc<Hub>`.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    state: Mutex<HubState>,
    /// Woken when `HubState::turns` gains something.
    turned: Notify,
}

#[derive(Debug, Default)]
struct HubState {
    /// Track → its open streams. A fan-out takes a reference to the list and releases
    /// the lock before it pushes to thousands of streams; a change copies the list only
    /// while such a fan-out still holds it (`Arc::make_mut`), so opening n streams on
    /// one track costs O(n), not O(n²).
    tracks: HashMap<Arc<str>, Arc<Vec<Arc<Slot>>>>,
    /// Uid → its open streams (a listener may have several).
    uids: HashMap<Arc<str>, Vec<Arc<Slot>>>,
    /// What presence has not looked at yet.
    turns: Turns,
}

/// Uids and tracks that may have gained their first open stream or lost their last
/// since presence last looked. Sets, so a flapping listener is noted once: bounded by
/// the uids and tracks that exist. Kept only once presence watches.
#[derive(Debug, Default)]
struct Turns {
    watched: bool,
    uids: HashSet<Arc<str>>,
    tracks: HashSet<Arc<str>>,
    /// Something was noted since presence was last woken.
    fresh: bool,
}

impl Turns {
    fn uid(&mut self, uid: &Arc<str>) {
        if self.watched {
            self.uids.insert(uid.clone());
            self.fresh = true;
        }
    }

    fn track(&mut self, track: &Arc<str>) {
        if self.watched {
            self.tracks.insert(track.clone());
            self.fresh = true;
        }
    }
}

/// One open stream's place in the hub.
#[derive(Debug)]
struct Slot {
    uid: Arc<str>,
    queue: Mutex<Queue>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Arc<Message>>,
    /// The JSON bytes of `items`.
    bytes: usize,
    tracks: Vec<Arc<str>>,
    lagged: bool,
    forgotten: bool,
}

/// What a stream gets from its queue.
#[derive(Debug)]
pub(crate) enum Received {
    /// Messages, in log order (some may be at or below the stream's cursor: skip those).
    Messages(VecDeque<Arc<Message>>),
    /// The queue overflowed and was emptied: read from the store after your cursor.
    Lagged,
    /// The listener was forgotten (`disconnect` without a track, or expiry).
    Forgotten,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps half-changed in a way that matters
    // more than stopping delivery would.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Slot {
    fn push(&self, message: &Arc<Message>) {
        {
            let mut queue = lock(&self.queue);
            if queue.lagged || queue.forgotten {
                return;
            }
            let size = message.json.len();
            let too_many = queue.items.len() >= QUEUE_CAPACITY;
            // One message larger than the bound still queues alone.
            let too_big = queue.bytes + size > QUEUE_BYTES && !queue.items.is_empty();
            if too_many || too_big {
                queue.items = VecDeque::new();
                queue.bytes = 0;
                queue.lagged = true;
            } else {
                queue.items.push_back(message.clone());
                queue.bytes += size;
            }
        }
        self.notify.notify_one();
    }
}

/// An open stream's registration; dropping it unregisters the stream.
#[derive(Debug)]
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    slot: Arc<Slot>,
}

impl Subscription {
    /// Adds tracks to what this stream receives (already present ones are ignored).
    pub(crate) fn add_tracks<'a>(&self, tracks: impl IntoIterator<Item = &'a str>) {
        let mut state = lock(&self.hub.state);
        for track in tracks {
            state.add(&self.slot, track.into());
        }
        self.hub.wake_presence(state);
    }

    /// Waits for the next messages, or news that the stream must read from the store.
    /// Cancel-safe: nothing is taken from the queue unless this returns.
    pub(crate) async fn recv(&self) -> Received {
        loop {
            {
                let mut queue = lock(&self.slot.queue);
                if queue.forgotten {
                    return Received::Forgotten;
                }
                if queue.lagged {
                    // From now on new messages queue again; the caller reads the store
                    // after this point, so nothing falls between.
                    queue.lagged = false;
                    return Received::Lagged;
                }
                if !queue.items.is_empty() {
                    queue.bytes = 0;
                    return Received::Messages(std::mem::take(&mut queue.items));
                }
            }
            self.slot.notify.notified().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = lock(&self.hub.state);
        state.remove(&self.slot);
        self.hub.wake_presence(state);
    }
}

impl HubState {
    fn add(&mut self, slot: &Arc<Slot>, track: Arc<str>) {
        {
            let mut queue = lock(&slot.queue);
            if queue.tracks.contains(&track) {
                return;
            }
            queue.tracks.push(track.clone());
        }
        let list = self.tracks.entry(track.clone()).or_default();
        if list.is_empty() {
            self.turns.track(&track);
        }
        Arc::make_mut(list).push(slot.clone());
    }

    fn remove_from_track(&mut self, slot: &Arc<Slot>, track: &str) {
        let Some(list) = self.tracks.get_mut(track) else {
            return;
        };
        let Some(at) = list.iter().position(|s| Arc::ptr_eq(s, slot)) else {
            return;
        };
        if list.len() == 1 {
            if let Some((track, _)) = self.tracks.remove_entry(track) {
                self.turns.track(&track);
            }
        } else {
            // Order within a track does not matter: every stream gets every message.
            Arc::make_mut(list).swap_remove(at);
        }
    }

    fn remove(&mut self, slot: &Arc<Slot>) {
        let tracks = std::mem::take(&mut lock(&slot.queue).tracks);
        for track in &tracks {
            self.remove_from_track(slot, track);
        }
        if let Some(slots) = self.uids.get_mut(&slot.uid) {
            slots.retain(|s| !Arc::ptr_eq(s, slot));
            if slots.is_empty() {
                self.uids.remove(&slot.uid);
                self.turns.uid(&slot.uid);
            }
        }
    }
}

impl Hub {
    /// Registers a stream for `uid` with no tracks yet. Register *before* reading the
    /// listener from the store: changes committed after that reach the stream here.
    pub(crate) fn subscribe(self: &Arc<Self>, uid: &str) -> Subscription {
        let slot = Arc::new(Slot {
            uid: uid.into(),
            queue: Mutex::default(),
            notify: Notify::new(),
        });
        let mut state = lock(&self.state);
        let slots = state.uids.entry(slot.uid.clone()).or_default();
        slots.push(slot.clone());
        if slots.len() == 1 {
            state.turns.uid(&slot.uid);
        }
        self.wake_presence(state);
        Subscription {
            hub: self.clone(),
            slot,
        }
    }

    /// How many streams `uid` has open on this node.
    pub(crate) fn online(&self, uid: &str) -> usize {
        lock(&self.state).uids.get(uid).map_or(0, Vec::len)
    }

    /// How many listeners have a stream open on this node.
    pub(crate) fn online_count(&self) -> usize {
        lock(&self.state).uids.len()
    }

    /// How many distinct listeners have a stream open on this node that receives `track`.
    pub(crate) fn online_in_track(&self, track: &str) -> usize {
        let state = lock(&self.state);
        let Some(slots) = state.tracks.get(track) else {
            return 0;
        };
        let uids: HashSet<&Arc<str>> = slots.iter().map(|s| &s.uid).collect();
        uids.len()
    }

    /// Whether some stream open on this node receives `track`.
    pub(crate) fn track_open(&self, track: &str) -> bool {
        lock(&self.state).tracks.contains_key(track)
    }

    /// Every uid with a stream open on this node, and every track such a stream
    /// receives (for presence to start from, or to write again).
    pub(crate) fn open(&self) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let state = lock(&self.state);
        (
            state.uids.keys().cloned().collect(),
            state.tracks.keys().cloned().collect(),
        )
    }

    /// Releases the lock, and wakes presence if a turn was noted under it: presence
    /// wakes per turn, not per stream or per subscription change.
    fn wake_presence(&self, mut state: MutexGuard<'_, HubState>) {
        let fresh = std::mem::take(&mut state.turns.fresh);
        drop(state);
        if fresh {
            self.turned.notify_one();
        }
    }

    /// Starts noting turns for [`Hub::take_turns`]; until then none are kept.
    pub(crate) fn watch(&self) {
        lock(&self.state).turns.watched = true;
    }

    /// Waits until something may have turned since the last [`Hub::take_turns`].
    pub(crate) async fn turned(&self) {
        self.turned.notified().await;
    }

    /// The uids and tracks whose first stream opened or last one closed since the last
    /// call (look at each again: it may have turned back).
    pub(crate) fn take_turns(&self) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let mut state = lock(&self.state);
        let turns = &mut state.turns;
        (turns.uids.drain().collect(), turns.tracks.drain().collect())
    }
}

impl Tail for Hub {
    fn apply(&self, changes: &[Change], _commit_took: Duration) {
        // Decide who gets what under the lock; push after releasing it.
        let mut deliveries = Vec::new();
        let turned;
        {
            let mut state = lock(&self.state);
            for change in changes {
                match change {
                    Change::Appended(message) => {
                        if let Some(slots) = state.tracks.get(&message.track) {
                            deliveries.push((message, slots.clone()));
                        }
                    }
                    Change::Connected { uid, track } => {
                        let slots = state.uids.get(uid).cloned().unwrap_or_default();
                        for slot in &slots {
                            state.add(slot, track.clone());
                        }
                    }
                    Change::Lost => {
                        for slot in state.uids.values().flatten() {
                            let mut queue = lock(&slot.queue);
                            queue.items = VecDeque::new();
                            queue.bytes = 0;
                            queue.lagged = true;
                            drop(queue);
                            slot.notify.notify_one();
                        }
                    }
                    Change::Disconnected { uid, track } => {
                        let slots = state.uids.get(uid).cloned().unwrap_or_default();
                        for slot in &slots {
                            match track {
                                Some(track) => {
                                    lock(&slot.queue).tracks.retain(|t| t != track);
                                    state.remove_from_track(slot, track);
                                }
                                None => {
                                    lock(&slot.queue).forgotten = true;
                                    slot.notify.notify_one();
                                }
                            }
                        }
                    }
                }
            }
            // Per commit, a flag: nothing per message.
            turned = std::mem::take(&mut state.turns.fresh);
        }
        if turned {
            self.turned.notify_one();
        }
        for (message, slots) in deliveries {
            for slot in slots.iter() {
                slot.push(message);
            }
        }
    }
}
