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
//! Waking is per stream and per commit: a commit's messages for one stream are queued
//! under one lock of its queue, and its task is woken once, by the waker it left there
//! (no per-stream shutdown watch either: at shutdown the hub wakes every stream once,
//! [`Hub::close`]).
//!
//! It also notes, for `presence`, each uid and track whose "has an open stream on this
//! node" may have turned (a first stream opened, a last one closed): presence looks at
//! those only, so it costs nothing per message.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
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
/// Largest spare queue (in messages) a stream keeps for its next messages: the two
/// buffers it swaps stay allocated between wake-ups (no allocation per delivery), but
/// one grown by a burst is let go rather than kept for the stream's life.
const SPARE_QUEUE_CAPACITY: usize = 64;

/// The live fan-out. Share it as `Arc<Hub>`.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    state: Mutex<HubState>,
    /// Woken when `HubState::turns` gains something.
    turned: Notify,
    /// Set once by [`Hub::close`]: every stream ends.
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct HubState {
    /// Track → its open streams. A fan-out takes a reference to the list and releases
    /// the lock before it pushes to thousands of streams; a change copies the list only
    /// while such a fan-out still holds it (`Arc::make_mut`), so opening n streams on
    /// one track costs O(n), not O(n²).
    tracks: HashMap<Arc<str>, Streams>,
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

/// The open streams of one track, shared with a fan-out in progress.
type Streams = Arc<Vec<Arc<Slot>>>;

/// One open stream's place in the hub.
#[derive(Debug)]
struct Slot {
    uid: Arc<str>,
    queue: Mutex<Queue>,
    /// Whether the stream ever had more than one track: only then can one commit bring
    /// it messages of several tracks, which must be merged into log order. Never
    /// cleared, so a fan-out that reads it late errs on the merging side.
    several_tracks: AtomicBool,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Arc<Message>>,
    /// The JSON bytes of `items`.
    bytes: usize,
    tracks: Vec<Arc<str>>,
    lagged: bool,
    forgotten: bool,
    /// The stream's task, while it waits for this queue. Kept under the queue's lock, so
    /// a push either sees it or the stream sees the push: no wake-up is lost, and a
    /// wake-up costs no lock of its own.
    waiter: Option<Waker>,
}

impl Queue {
    /// Takes the waiting task to wake once the lock is released.
    fn wake(&mut self) -> Option<Waker> {
        self.waiter.take()
    }
}

/// What a stream gets from its queue.
#[derive(Debug)]
pub(crate) enum Received {
    /// Messages were appended to the caller's buffer, in log order (some may be at or
    /// below the stream's cursor: skip those).
    Messages,
    /// The queue overflowed and was emptied: read from the store after your cursor.
    Lagged,
    /// The listener was forgotten (`disconnect` without a track, or expiry).
    Forgotten,
    /// The server is shutting down.
    Closed,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps half-changed in a way that matters
    // more than stopping delivery would.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Slot {
    /// Queues `messages` (in log order) under one lock and wakes the stream once: a
    /// commit of many messages costs a stream one lock and one wake-up, not one each.
    fn push<'m>(&self, messages: impl IntoIterator<Item = &'m Arc<Message>>) {
        let waiter = {
            let mut queue = lock(&self.queue);
            if queue.lagged || queue.forgotten {
                // The stream was woken when that was set; nothing changes for it.
                return;
            }
            for message in messages {
                let size = message.json.len();
                let too_many = queue.items.len() >= QUEUE_CAPACITY;
                // One message larger than the bound still queues alone.
                let too_big = queue.bytes + size > QUEUE_BYTES && !queue.items.is_empty();
                if too_many || too_big {
                    // The rest of the commit is read from the store too.
                    queue.items = VecDeque::new();
                    queue.bytes = 0;
                    queue.lagged = true;
                    break;
                }
                queue.items.push_back(message.clone());
                queue.bytes += size;
            }
            queue.wake()
        };
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }

    /// Changes the queue with `change` and wakes the stream.
    fn tell(&self, change: impl FnOnce(&mut Queue)) {
        let waiter = {
            let mut queue = lock(&self.queue);
            change(&mut queue);
            queue.wake()
        };
        if let Some(waiter) = waiter {
            waiter.wake();
        }
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

    /// Waits for the next messages, appended to `into` (which keeps its allocation: the
    /// queue and `into` swap buffers when `into` is empty), or news that the stream
    /// must read from the store. Cancel-safe: nothing is taken from the queue unless
    /// this returns.
    pub(crate) fn recv<'a>(
        &'a self,
        into: &'a mut VecDeque<Arc<Message>>,
    ) -> impl Future<Output = Received> + 'a {
        // A bare `poll_fn`, not an `async fn` around one: this future is part of every
        // waiting stream's task, so its size is every idle stream's.
        std::future::poll_fn(move |cx| {
            let mut queue = lock(&self.slot.queue);
            // Looked at under the queue's lock, which `Hub::close` takes after setting
            // it: either this sees it, or `close` finds the waker left below.
            if self.hub.closed.load(Ordering::Acquire) {
                return Poll::Ready(Received::Closed);
            }
            if queue.forgotten {
                return Poll::Ready(Received::Forgotten);
            }
            if queue.lagged {
                // From now on new messages queue again; the caller reads the store
                // after this point, so nothing falls between.
                queue.lagged = false;
                return Poll::Ready(Received::Lagged);
            }
            if queue.items.is_empty() {
                match &mut queue.waiter {
                    Some(waiter) if waiter.will_wake(cx.waker()) => {}
                    waiter => *waiter = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            queue.bytes = 0;
            if into.is_empty() {
                std::mem::swap(&mut queue.items, into);
                if queue.items.capacity() > SPARE_QUEUE_CAPACITY {
                    queue.items = VecDeque::new();
                }
            } else {
                into.extend(queue.items.drain(..));
            }
            Poll::Ready(Received::Messages)
        })
    }

    /// Whether the server is shutting down (every stream ends).
    pub(crate) fn closed(&self) -> bool {
        self.hub.closed.load(Ordering::Acquire)
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
            if queue.tracks.len() > 1 {
                slot.several_tracks.store(true, Ordering::Relaxed);
            }
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
            several_tracks: AtomicBool::new(false),
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

    /// Ends every open stream (and any opened from now on): the server is shutting
    /// down. Each stream is woken once, here, rather than each watching for shutdown
    /// itself on every wake-up.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let state = lock(&self.state);
        for slot in state.uids.values().flatten() {
            slot.tell(|_| {});
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
                            slot.tell(|queue| {
                                queue.items = VecDeque::new();
                                queue.bytes = 0;
                                queue.lagged = true;
                            });
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
                                None => slot.tell(|queue| queue.forgotten = true),
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
        fan_out(&deliveries);
    }
}

/// Pushes each message of a commit (in log order, with its track's streams) to its
/// streams: each stream gets everything of the commit that is its own under one lock,
/// in log order, and is woken once.
fn fan_out(deliveries: &[(&Arc<Message>, Streams)]) {
    // The commit's messages grouped by track, each group in log order (a stable sort of
    // the messages, not of every delivery: a commit's tracks are few next to its
    // deliveries).
    let mut by_track: Vec<usize> = (0..deliveries.len()).collect();
    by_track.sort_by_key(|&index| Arc::as_ptr(&deliveries[index].1));
    // Deliveries to streams of several tracks, to be merged into log order.
    let mut merged: Vec<(*const Slot, usize, &Arc<Slot>)> = Vec::new();
    for group in by_track.chunk_by(|&a, &b| Arc::ptr_eq(&deliveries[a].1, &deliveries[b].1)) {
        let messages = || group.iter().map(|&index| deliveries[index].0);
        for slot in deliveries[group[0]].1.iter() {
            if slot.several_tracks.load(Ordering::Relaxed) {
                merged.extend(group.iter().map(|&index| (Arc::as_ptr(slot), index, slot)));
            } else {
                slot.push(messages());
            }
        }
    }
    if merged.is_empty() {
        return;
    }
    // Sorting by (stream, message index) puts each stream's messages together, in order
    // (a stream skips anything at or below its cursor, so order is not optional).
    merged.sort_unstable_by_key(|&(slot, index, _)| (slot, index));
    for run in merged.chunk_by(|a, b| a.0 == b.0) {
        run[0]
            .2
            .push(run.iter().map(|&(_, index, _)| deliveries[index].0));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};
    use std::time::Duration;

    use super::{Hub, QUEUE_CAPACITY, Received, Subscription};
    use crate::engine::{Change, Message, Tail};

    /// Counts the wake-ups of a stream's task.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A stream that polls its queue by hand, counting its wake-ups.
    struct Stream {
        subscription: Subscription,
        wakes: Arc<Wakes>,
        pending: VecDeque<Arc<Message>>,
    }

    impl Stream {
        fn open(hub: &Arc<Hub>, uid: &str, tracks: &[&str]) -> Self {
            let subscription = hub.subscribe(uid);
            subscription.add_tracks(tracks.iter().copied());
            Self {
                subscription,
                wakes: Arc::default(),
                pending: VecDeque::new(),
            }
        }

        /// Polls `recv` once: `None` while it waits (its waker is then in the queue).
        fn poll(&mut self) -> Option<Received> {
            let waker = Waker::from(self.wakes.clone());
            let mut cx = Context::from_waker(&waker);
            let recv = std::pin::pin!(self.subscription.recv(&mut self.pending));
            match recv.poll(&mut cx) {
                Poll::Ready(received) => Some(received),
                Poll::Pending => None,
            }
        }

        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::SeqCst)
        }

        fn positions(&mut self) -> Vec<u64> {
            self.pending.drain(..).map(|m| m.pos).collect()
        }
    }

    fn appended(pos: u64, track: &str) -> Change {
        Change::Appended(Arc::new(Message::new(pos, track.into(), "{}".into(), 0)))
    }

    #[test]
    fn a_commit_reaches_each_stream_in_log_order_with_one_wake_up() {
        let hub = Arc::new(Hub::default());
        let mut both = Stream::open(&hub, "listener-both", &["a", "b"]);
        let mut only_b = Stream::open(&hub, "listener-b", &["b"]);
        let mut other = Stream::open(&hub, "listener-c", &["c"]);
        for stream in [&mut both, &mut only_b, &mut other] {
            assert!(stream.poll().is_none(), "nothing queued yet");
        }
        // Several tracks in one commit: the multi-track stream must still get its
        // messages in log order, not track by track.
        let commit: Vec<Change> = [(1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, "a")]
            .into_iter()
            .map(|(pos, track)| appended(pos, track))
            .collect();
        hub.apply(&commit, Duration::ZERO);
        assert_eq!((both.wakes(), only_b.wakes(), other.wakes()), (1, 1, 0));
        assert!(matches!(both.poll(), Some(Received::Messages)));
        assert_eq!(both.positions(), [1, 2, 3, 4, 5]);
        assert!(matches!(only_b.poll(), Some(Received::Messages)));
        assert_eq!(only_b.positions(), [2, 4]);
        // One track in the commit (the big fan-outs' shape): the same, without sorting.
        assert!(both.poll().is_none());
        assert!(only_b.poll().is_none());
        hub.apply(&[appended(6, "b"), appended(7, "b")], Duration::ZERO);
        assert_eq!((both.wakes(), only_b.wakes()), (2, 2));
        assert!(matches!(both.poll(), Some(Received::Messages)));
        assert_eq!(both.positions(), [6, 7]);
        assert!(matches!(only_b.poll(), Some(Received::Messages)));
        assert_eq!(only_b.positions(), [6, 7]);
    }

    #[test]
    fn a_commit_that_overflows_a_queue_marks_it_lagged_and_drops_the_rest() {
        let hub = Arc::new(Hub::default());
        let mut stream = Stream::open(&hub, "listener-slow", &["a"]);
        let commit: Vec<Change> = (1..=QUEUE_CAPACITY as u64 + 2)
            .map(|pos| appended(pos, "a"))
            .collect();
        hub.apply(&commit, Duration::ZERO);
        assert!(matches!(stream.poll(), Some(Received::Lagged)));
        assert!(
            stream.positions().is_empty(),
            "the stream reads the store instead"
        );
        // After the lag is taken, new messages queue again.
        hub.apply(&[appended(QUEUE_CAPACITY as u64 + 3, "a")], Duration::ZERO);
        assert!(matches!(stream.poll(), Some(Received::Messages)));
        assert_eq!(stream.positions(), [QUEUE_CAPACITY as u64 + 3]);
    }

    #[test]
    fn closing_the_hub_wakes_every_stream_once_and_ends_those_opened_later() {
        let hub = Arc::new(Hub::default());
        let mut waiting = Stream::open(&hub, "listener-waiting", &["a"]);
        assert!(waiting.poll().is_none());
        hub.close();
        assert_eq!(waiting.wakes(), 1);
        assert!(matches!(waiting.poll(), Some(Received::Closed)));
        let mut late = Stream::open(&hub, "listener-late", &["a"]);
        assert!(matches!(late.poll(), Some(Received::Closed)));
    }
}
