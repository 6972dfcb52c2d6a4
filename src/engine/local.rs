//! The single-node engines' common part: one writer thread that owns every write and
//! commits in groups, and the reads that merge a listener's tracks into its queue.
//!
//! A storage (`memory`, `embedded`) only has to offer a [`Snapshot`] to read from and a
//! [`StorageTxn`] to write in; the rules — positions, subscriptions, cursors, retention,
//! expiry, idempotency keys — live here once.
//!
//! Why one writer: the order the writer takes updates is the log order, every commit
//! costs one sync however many updates it carries, and the [`Tail`] hears every change
//! in exactly that order — which is what keeps live delivery gap-free.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::acks::{Ack, PendingAcks};
use super::{
    Appended, Change, Engine, EngineError, History, IdempotencyKey, Limits, Listener, Message,
    Position, Replay, Result, StoreCounts, Subscribers, Subscription, TICK, Tail, Update, now_ms,
};

/// How many operations the writer takes into one commit. Bounds a commit's size (and
/// so its latency) under heavy load; each operation may carry up to 1,000 messages.
const MAX_OPS_PER_COMMIT: usize = 512;
/// Room in the writer's inbox; callers wait (asynchronously) when it is full, which is
/// the back-pressure on publishers when the disk cannot keep up.
const OP_QUEUE: usize = 4096;
/// Most messages, listeners or idempotency keys deleted by retention and expiry in one
/// commit, so a big clean-up never stalls publishers for long; the rest goes in the
/// next ticks.
const MAX_DELETES_PER_COMMIT: usize = 10_000;

/// The log's bounds, kept by the storage beside the data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// The last position handed out.
    pub head: Position,
    /// Every position up to this one has been deleted.
    pub trimmed_through: Position,
}

/// What the store remembers of an append made with an `Idempotency-Key`. The positions
/// of one append are consecutive (the writer hands them out in one go), so the first
/// and the count say them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyRecord {
    /// When the append was committed (ms since the epoch): the key expires from then.
    pub time_ms: u64,
    /// The digest of its updates ([`IdempotencyKey::digest`]).
    pub digest: String,
    /// Its first position.
    pub first: Position,
    /// How many messages it stored.
    pub count: u64,
}

impl KeyRecord {
    /// The append's positions.
    pub(crate) fn positions(&self) -> Vec<Position> {
        (self.first..self.first + self.count).collect()
    }
}

/// A consistent view to read from.
pub(crate) trait Snapshot {
    /// The log's bounds.
    fn bounds(&self) -> Result<Bounds>;
    /// A listener as stored.
    fn listener(&self, uid: &str) -> Result<Option<Listener>>;
    /// Up to `limit` messages of `track` after `after`, in order.
    fn track_after(&self, track: &str, after: Position, limit: usize) -> Result<Vec<Arc<Message>>>;
    /// Counts of what is stored.
    fn counts(&self) -> Result<StoreCounts>;
    /// How many listeners `track` has, and up to `limit` of their uids after `after`,
    /// in order.
    fn subscribers(&self, track: &str, after: &str, limit: usize) -> Result<(u64, Vec<String>)>;
    /// Up to `limit` uids of listeners last seen before `seen_before_ms`.
    fn stale_listeners(&self, seen_before_ms: u64, limit: usize) -> Result<Vec<String>>;
    /// When `uid`'s tokens were last revoked (ms since the epoch), if recorded.
    fn revocation(&self, uid: &str) -> Result<Option<u64>>;
    /// Up to `limit` uids whose revocation was recorded before `before_ms`.
    fn old_revocations(&self, before_ms: u64, limit: usize) -> Result<Vec<String>>;
}

/// One write transaction: nothing is visible to readers before `commit`.
pub(crate) trait StorageTxn: Snapshot {
    /// Stores a message at its position.
    fn append(&mut self, message: &Arc<Message>) -> Result<()>;
    /// The oldest stored message's position and time.
    fn oldest(&self) -> Result<Option<(Position, u64)>>;
    /// Deletes the oldest stored message.
    fn delete_oldest(&mut self) -> Result<()>;
    /// Writes a listener.
    fn put_listener(&mut self, listener: &Listener) -> Result<()>;
    /// Deletes a listener.
    fn remove_listener(&mut self, uid: &str) -> Result<()>;
    /// Records that `uid`'s tokens issued up to `at_ms` are revoked (replacing an older
    /// revocation).
    fn put_revocation(&mut self, uid: &str, at_ms: u64) -> Result<()>;
    /// Drops `uid`'s revocation.
    fn remove_revocation(&mut self, uid: &str) -> Result<()>;
    /// Records that `uid` is subscribed to `track` (`true`) or no longer is: the
    /// track's count and its index by uid (the track is gone at zero).
    fn set_subscribed(&mut self, track: &str, uid: &str, subscribed: bool) -> Result<()>;
    /// Writes the log's bounds.
    fn set_bounds(&mut self, bounds: Bounds) -> Result<()>;
    /// The append recorded under an idempotency key, including one recorded earlier in
    /// this transaction.
    fn idempotency_key(&self, key: &str) -> Result<Option<KeyRecord>>;
    /// Records an append under an idempotency key.
    fn put_idempotency_key(&mut self, key: &str, record: &KeyRecord) -> Result<()>;
    /// Forgets up to `limit` keys recorded before `before_ms`, oldest first; returns
    /// how many it forgot.
    fn expire_idempotency_keys(&mut self, before_ms: u64, limit: usize) -> Result<usize>;
    /// Makes it all durable (as the storage promises) and visible.
    fn commit(self) -> Result<()>;
}

/// A place to keep the log and the listeners.
pub(crate) trait Storage: Send + Sync + 'static {
    /// A read view.
    type Snap<'a>: Snapshot
    where
        Self: 'a;
    /// A write transaction.
    type Txn<'a>: StorageTxn
    where
        Self: 'a;
    /// Opens a read view.
    fn read(&self) -> Result<Self::Snap<'_>>;
    /// Begins the (only) write transaction.
    fn write(&self) -> Result<Self::Txn<'_>>;
    /// The error for a storage that panicked: `what` is the panic's message.
    fn corrupt(&self, what: &str) -> EngineError {
        EngineError::Corrupt(format!("the store failed: {what}"))
    }
    /// Gets ready to write again after a failed commit (a storage that cannot go on
    /// after an I/O error reopens its file here). Called by the writer before its next
    /// commit; an error means "not yet".
    fn recover(&self) -> Result<()> {
        Ok(())
    }
    /// Whether the last commit, though it failed, made its messages durable and
    /// visible (a storage in two parts can fail after the first); cleared by the call.
    /// The tail then hears [`Change::Lost`], so open streams read them from the store.
    fn take_partial_commit(&self) -> bool {
        false
    }
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum Op {
    Append(Vec<Update>, Option<IdempotencyKey>, Reply<Appended>),
    Connect(String, Vec<String>, Reply<Vec<String>>),
    Disconnect(String, Option<String>, Reply<Option<Vec<String>>>),
    Tick,
    Close(oneshot::Sender<()>),
}

/// The exit status when the writer fails beyond repair (EX_SOFTWARE).
const WRITER_FAILED_EXIT: i32 = 70;

/// A panic's message, as text.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// Deliveries recorded but not yet committed, shared by the engine and its writer.
type Acks = Arc<PendingAcks>;

/// An engine over a local storage. See the module docs.
pub(crate) struct LocalEngine<S: Storage> {
    kind: &'static str,
    storage: Arc<S>,
    ops_tx: mpsc::Sender<Op>,
    /// Wakes the writer once per runtime turn for all the ops queued in it.
    kick: Arc<Kick>,
    acks: Acks,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set while the last commit failed: `/healthz` says so until one succeeds.
    failing: Arc<AtomicBool>,
    /// Set once a read found the file damaged.
    corrupt: AtomicBool,
    /// How long a revocation counts (the sweep drops it a little later).
    revocation_ttl: Duration,
}

impl<S: Storage> std::fmt::Debug for LocalEngine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEngine")
            .field("kind", &self.kind)
            .finish()
    }
}

impl<S: Storage> LocalEngine<S> {
    /// Starts the writer thread and the tick that drives flushes and clean-up. Must be
    /// called inside a Tokio runtime.
    pub(crate) fn start(
        storage: S,
        kind: &'static str,
        limits: Limits,
        tail: Arc<dyn Tail>,
    ) -> Self {
        let storage = Arc::new(storage);
        let acks = Acks::default();
        let failing = Arc::new(AtomicBool::new(false));
        let (ops_tx, ops_rx) = mpsc::channel(OP_QUEUE);
        let revocation_ttl = limits.revocation_ttl;
        let writer = Writer {
            storage: storage.clone(),
            acks: acks.clone(),
            failing: failing.clone(),
            limits,
            tail,
            last_maintenance: Instant::now(),
            last_ack_flush: Instant::now(),
        };
        let writer = std::thread::Builder::new()
            .name("dolores-writer".into())
            .spawn(move || writer.run(ops_rx))
            .ok();
        let kick = Arc::new(Kick {
            pending: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
            writer: writer.as_ref().map(|w| w.thread().clone()),
        });
        let weak_tx = ops_tx.downgrade();
        let kicker = kick.clone();
        tokio::spawn(async move {
            loop {
                kicker.notify.notified().await;
                if weak_tx.upgrade().is_none() {
                    break;
                }
                // Let every task ready in this turn of the runtime queue its op first:
                // a yielded task runs again only after the others (and the I/O
                // driver), so one wake-up of the writer takes them all.
                tokio::task::yield_now().await;
                kicker.pending.store(false, Ordering::Release);
                kicker.wake_writer();
            }
        });
        let weak_tx = ops_tx.downgrade();
        let ticker = kick.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            loop {
                tick.tick().await;
                let Some(tx) = weak_tx.upgrade() else { break };
                if tx.is_closed() {
                    break;
                }
                // A full inbox means the writer is busy and will flush anyway.
                let _ = tx.try_send(Op::Tick);
                ticker.wake_writer();
            }
        });
        Self {
            kind,
            storage,
            ops_tx,
            kick,
            acks,
            writer: Mutex::new(writer),
            failing,
            corrupt: AtomicBool::new(false),
            revocation_ttl,
        }
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        let (done_tx, done_rx) = oneshot::channel();
        self.ops_tx
            .send(op(done_tx))
            .await
            .map_err(|_| EngineError::Closed)?;
        self.kick.soon();
        done_rx.await.map_err(|_| EngineError::Closed)?
    }

    /// Reads on the caller's thread. A read is a few B-tree lookups in cached pages
    /// (the embedded store keeps 64 MiB of them) or a map lookup (memory); handing it
    /// to a blocking thread cost more than the read — a thread switch or a new thread,
    /// ~15 µs of a stream's opening, measured — and a cold page only delays this one
    /// worker for one disk read.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&S::Snap<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        // A damaged file can make the storage panic mid-read (redb does on a page that
        // fails its checks): that is a 503 naming the file, not a dropped connection.
        let storage = &self.storage;
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&storage.read()?)))
            .unwrap_or_else(|panic| Err(storage.corrupt(&panic_text(&*panic))));
        if let Err(EngineError::Corrupt(_)) = &read {
            // Sticky: a damaged file does not mend itself; `/healthz` says so until the
            // server is restarted on a repaired store.
            self.corrupt.store(true, Ordering::Relaxed);
        }
        read
    }
}

#[async_trait::async_trait]
impl<S: Storage> Engine for LocalEngine<S> {
    fn healthy(&self) -> bool {
        !self.failing.load(Ordering::Relaxed) && !self.corrupt.load(Ordering::Relaxed)
    }

    fn kind(&self) -> &'static str {
        self.kind
    }

    async fn append_with_key(
        &self,
        updates: Vec<Update>,
        key: Option<IdempotencyKey>,
    ) -> Result<Appended> {
        self.call(|done| Op::Append(updates, key, done)).await
    }

    async fn connect(&self, uid: &str, tracks: Vec<String>) -> Result<Vec<String>> {
        self.call(|done| Op::Connect(uid.to_owned(), tracks, done))
            .await
    }

    async fn disconnect(&self, uid: &str, track: Option<String>) -> Result<Option<Vec<String>>> {
        self.call(|done| Op::Disconnect(uid.to_owned(), track, done))
            .await
    }

    async fn revoked_at(&self, uid: &str) -> Result<Option<u64>> {
        let owned = uid.to_owned();
        let at = self.read(move |snap| snap.revocation(&owned)).await?;
        // The sweep runs only now and then: one past its time no longer counts.
        let kept_after = now_ms().saturating_sub(self.revocation_ttl.as_millis() as u64);
        Ok(at.filter(|&at| at >= kept_after))
    }

    async fn listener(&self, uid: &str) -> Result<Option<Listener>> {
        let owned = uid.to_owned();
        self.acks
            .merged(uid, self.read(move |snap| snap.listener(&owned)))
            .await
    }

    async fn replay(&self, uid: &str, after: Position, limit: usize) -> Result<Option<Replay>> {
        let uid = uid.to_owned();
        self.read(move |snap| read_replay(snap, &uid, after, limit))
            .await
    }

    async fn subscribers(&self, track: &str, after: &str, limit: usize) -> Result<Subscribers> {
        let (track, after) = (track.to_owned(), after.to_owned());
        let (count, listeners) = self
            .read(move |snap| {
                let (count, uids) = snap.subscribers(&track, &after, limit)?;
                let mut listeners = Vec::with_capacity(uids.len());
                for uid in uids {
                    // Gone between the index and the record: not a subscriber any more.
                    if let Some(listener) = snap.listener(&uid)? {
                        listeners.push(listener);
                    }
                }
                Ok((count, listeners))
            })
            .await?;
        let page = listeners
            .into_iter()
            .map(|mut listener| {
                // Seen by an open stream since the last flush: the pending ack knows.
                if let Some(ack) = self.acks.get(&listener.uid) {
                    ack.apply_to(&mut listener);
                }
                (listener.uid, listener.last_seen_ms)
            })
            .collect();
        Ok(Subscribers { count, page })
    }

    async fn history(&self, track: &str, after: Position, limit: usize) -> Result<History> {
        let track = track.to_owned();
        self.read(move |snap| {
            let bounds = snap.bounds()?;
            Ok(History {
                messages: snap.track_after(&track, after, limit)?,
                head: bounds.head,
                trimmed_through: bounds.trimmed_through,
            })
        })
        .await
    }

    fn ack(&self, uid: &str, pos: Position) {
        self.acks.record(uid, pos);
    }

    async fn counts(&self) -> Result<StoreCounts> {
        self.read(|snap| snap.counts()).await
    }

    async fn close(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.ops_tx.send(Op::Close(done_tx)).await.is_ok() {
            self.kick.wake_writer();
            let _ = done_rx.await;
        }
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }

    #[cfg(test)]
    fn pending_acks(&self) -> &PendingAcks {
        &self.acks
    }
}

/// How callers wake the writer: an op queued sets `pending` and, if it was not set,
/// wakes the kicker task, which lets the rest of the runtime's turn queue theirs and
/// then wakes the writer once. Before, every op woke the writer thread by itself; on a
/// busy core the woken writer ran at once, took one op and woke the caller back: two
/// context switches a publish, and group commit grouped nothing (`docs/benchmarks.md`).
#[derive(Debug)]
struct Kick {
    pending: AtomicBool,
    notify: tokio::sync::Notify,
    writer: Option<std::thread::Thread>,
}

impl Kick {
    /// The writer will look at its inbox within this turn of the runtime.
    fn soon(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    /// The writer looks at its inbox now.
    fn wake_writer(&self) {
        if let Some(writer) = &self.writer {
            writer.unpark();
        }
    }
}

impl<S: Storage> Drop for LocalEngine<S> {
    fn drop(&mut self) {
        // The kicker ends, and the writer sees its inbox closed.
        self.kick.notify.notify_one();
        self.kick.wake_writer();
    }
}

/// A listener's queue from one snapshot: each track read after the later of `after`
/// and its subscription start, merged by position.
fn read_replay(
    snap: &impl Snapshot,
    uid: &str,
    after: Position,
    limit: usize,
) -> Result<Option<Replay>> {
    let Some(listener) = snap.listener(uid)? else {
        return Ok(None);
    };
    let bounds = snap.bounds()?;
    let mut messages = Vec::new();
    for sub in &listener.tracks {
        messages.extend(snap.track_after(&sub.track, after.max(sub.since), limit)?);
    }
    if listener.tracks.len() > 1 {
        messages.sort_unstable_by_key(|m| m.pos);
    }
    messages.truncate(limit);
    Ok(Some(Replay {
        messages,
        tracks: listener.tracks,
        head: bounds.head,
        trimmed_through: bounds.trimmed_through,
        epoch: 0,
    }))
}

/// The writer thread's state.
struct Writer<S: Storage> {
    storage: Arc<S>,
    acks: Acks,
    /// Whether the last commit failed; the next one first lets the storage recover.
    failing: Arc<AtomicBool>,
    limits: Limits,
    tail: Arc<dyn Tail>,
    last_maintenance: Instant,
    last_ack_flush: Instant,
}

/// What a commit owes its callers once it is done.
enum Answer {
    /// An append's own answer: a repeat with other updates fails alone, not the commit.
    Append(Reply<Appended>, Result<Appended>),
    Connect(Reply<Vec<String>>, Vec<String>),
    Disconnect(Reply<Option<Vec<String>>>, Option<Vec<String>>),
    Close(oneshot::Sender<()>),
}

impl Answer {
    fn send(self, failure: Option<&EngineError>) {
        let fail = || {
            failure
                .cloned()
                .unwrap_or_else(|| EngineError::Storage(String::new()))
        };
        match (self, failure) {
            (Answer::Append(tx, v), None) => drop(tx.send(v)),
            (Answer::Append(tx, _), Some(_)) => drop(tx.send(Err(fail()))),
            (Answer::Connect(tx, v), None) => drop(tx.send(Ok(v))),
            (Answer::Connect(tx, _), Some(_)) => drop(tx.send(Err(fail()))),
            (Answer::Disconnect(tx, v), None) => drop(tx.send(Ok(v))),
            (Answer::Disconnect(tx, _), Some(_)) => drop(tx.send(Err(fail()))),
            (Answer::Close(tx), _) => drop(tx.send(())),
        }
    }
}

impl<S: Storage> Writer<S> {
    fn run(mut self, mut ops_rx: mpsc::Receiver<Op>) {
        let mut closing = false;
        while !closing {
            // Woken by the kicker (`Kick`), not by each op: the channel's own wake-up
            // is never armed, since the writer only ever `try_recv`s. The timeout
            // bounds what a lost wake-up could cost.
            let first = match ops_rx.try_recv() {
                Ok(op) => op,
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::park_timeout(TICK);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            let mut ops = vec![first];
            while ops.len() < MAX_OPS_PER_COMMIT {
                match ops_rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            closing = ops.iter().any(|op| matches!(op, Op::Close(_)));
            let committed =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.commit(ops)));
            if let Err(panic) = committed {
                // The storage broke in a way it cannot report (a damaged file): nothing
                // can be written any more. End the process with an error, so that a
                // supervisor restarts it (and the store is checked as it opens), rather
                // than stay up refusing every write while looking healthy.
                let error = self.storage.corrupt(&panic_text(&*panic));
                tracing::error!("{error}; the writer stopped, exiting");
                std::process::exit(WRITER_FAILED_EXIT);
            }
        }
        // Whatever is still queued is refused: its callers see `Closed`.
        ops_rx.close();
    }

    /// Applies a group of operations in one transaction and answers every caller.
    fn commit(&mut self, ops: Vec<Op>) {
        let started = Instant::now();
        let mut answers = Vec::with_capacity(ops.len());
        let mut changes = Vec::new();
        let result = if self.failing.load(Ordering::Relaxed) {
            // Heal by itself: each new commit tries again (space may have been freed).
            self.storage.recover()
        } else {
            Ok(())
        };
        // Cursors are written once a tick, not with every commit: with thousands of
        // streams acking every delivery, writing them all in each publish's commit
        // made a publish cost a write per listener. Until written they are merged
        // from `acks` by every read, so nothing is redelivered. The snapshot is taken
        // before the transaction begins, so a flush held there (by the shared suite)
        // holds no lock of the store.
        let acks = if self.ack_flush_due(&ops) {
            self.acks.snapshot()
        } else {
            Vec::new()
        };
        let result = result.and_then(|()| self.apply(ops, &acks, &mut answers, &mut changes));
        match &result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the store writes again");
                }
                self.acks.forget_written(&acks);
            }
            Err(e) => {
                tracing::error!("commit failed, {} operation(s) refused: {e}", answers.len());
                self.failing.store(true, Ordering::Relaxed);
                changes.clear();
                if self.storage.take_partial_commit() {
                    changes.push(Change::Lost);
                }
            }
        }
        if !changes.is_empty() {
            self.tail.apply(&changes, started.elapsed());
        }
        let failure = result.err();
        for answer in answers {
            answer.send(failure.as_ref());
        }
    }

    /// Whether this commit writes the pending acks: on a tick, on close, and when a
    /// tick's worth of time passed (a busy writer's inbox may have no room for ticks).
    fn ack_flush_due(&mut self, ops: &[Op]) -> bool {
        let due = self.last_ack_flush.elapsed() >= TICK
            || ops.iter().any(|op| matches!(op, Op::Tick | Op::Close(_)));
        if due {
            self.last_ack_flush = Instant::now();
        }
        due
    }

    /// Runs one commit: every op in order (each answer waits for the commit), the
    /// pending acks, the `max_stored_messages` trim and, on a tick, the clean-up.
    fn apply(
        &mut self,
        ops: Vec<Op>,
        acks: &[(String, Ack)],
        answers: &mut Vec<Answer>,
        changes: &mut Vec<Change>,
    ) -> Result<()> {
        let mut txn = self.storage.write()?;
        let mut bounds = txn.bounds()?;
        let now = now_ms();
        let mut maintain = false;
        for op in ops {
            match op {
                Op::Append(updates, key, done) => {
                    let answer = append(&mut txn, &mut bounds, updates, key, now, changes)?;
                    answers.push(Answer::Append(done, answer));
                }
                Op::Connect(uid, tracks, done) => {
                    let tracks = connect(&mut txn, bounds.head, uid, tracks, now, changes)?;
                    answers.push(Answer::Connect(done, tracks));
                }
                Op::Disconnect(uid, track, done) => {
                    if track.is_none() {
                        txn.put_revocation(&uid, now)?;
                    }
                    let left = disconnect(&mut txn, &uid, track, changes)?;
                    answers.push(Answer::Disconnect(done, left));
                }
                Op::Tick => maintain = true,
                Op::Close(done) => answers.push(Answer::Close(done)),
            }
        }
        write_acks(&mut txn, acks)?;
        let deleted = self.trim_to_max(&mut txn, &mut bounds)?;
        if maintain && self.last_maintenance.elapsed() >= self.limits.clean_up_every() {
            self.last_maintenance = Instant::now();
            self.clean_up(&mut txn, &mut bounds, deleted, now, changes)?;
        }
        txn.set_bounds(bounds)?;
        txn.commit()?;
        Ok(())
    }

    /// Deletes the oldest messages while more than `max_stored_messages` are kept (at
    /// most [`MAX_DELETES_PER_COMMIT`]); returns how many went.
    fn trim_to_max(&self, txn: &mut S::Txn<'_>, bounds: &mut Bounds) -> Result<usize> {
        let mut deleted = 0;
        while bounds.head - bounds.trimmed_through > self.limits.max_stored_messages
            && deleted < MAX_DELETES_PER_COMMIT
        {
            bounds.trimmed_through = self.delete_oldest(txn, *bounds)?;
            deleted += 1;
        }
        Ok(deleted)
    }

    /// The tick's clean-up, bounded per commit: messages past `retention`, idempotency
    /// keys past their keep time, listeners unseen for `listener_ttl`, and revocations
    /// no token can outlive any more.
    fn clean_up(
        &self,
        txn: &mut S::Txn<'_>,
        bounds: &mut Bounds,
        mut deleted: usize,
        now: u64,
        changes: &mut Vec<Change>,
    ) -> Result<()> {
        let keep_after = self.limits.keep_messages_after(now);
        while deleted < MAX_DELETES_PER_COMMIT {
            match txn.oldest()? {
                Some((_, time)) if time < keep_after => {
                    bounds.trimmed_through = self.delete_oldest(txn, *bounds)?;
                    deleted += 1;
                }
                _ => break,
            }
        }
        txn.expire_idempotency_keys(self.limits.forget_keys_before(now), MAX_DELETES_PER_COMMIT)?;
        let seen_before = self.limits.forget_listeners_seen_before(now);
        for uid in txn.stale_listeners(seen_before, MAX_DELETES_PER_COMMIT)? {
            disconnect(txn, &uid, None, changes)?;
        }
        let revoked_before = now.saturating_sub(self.limits.revocation_ttl.as_millis() as u64);
        for uid in txn.old_revocations(revoked_before, MAX_DELETES_PER_COMMIT)? {
            txn.remove_revocation(&uid)?;
        }
        Ok(())
    }

    /// Deletes the oldest message; returns its position (now trimmed).
    fn delete_oldest(&self, txn: &mut S::Txn<'_>, bounds: Bounds) -> Result<Position> {
        let oldest = txn.oldest()?;
        txn.delete_oldest()?;
        Ok(oldest.map_or(bounds.head, |(pos, _)| pos))
    }
}

/// Appends `updates` after `bounds.head`, unless `key` was seen: then the first
/// request's positions (or `KeyReused` for another body). The key is checked in the
/// commit that would store the updates: two requests with one key in one group commit
/// store once.
fn append(
    txn: &mut impl StorageTxn,
    bounds: &mut Bounds,
    updates: Vec<Update>,
    key: Option<IdempotencyKey>,
    now: u64,
    changes: &mut Vec<Change>,
) -> Result<Result<Appended>> {
    if let Some(key) = &key
        && let Some(seen) = txn.idempotency_key(key.key())?
    {
        return Ok(if seen.digest == key.digest() {
            Ok(Appended {
                positions: seen.positions(),
                repeated: true,
            })
        } else {
            Err(EngineError::KeyReused)
        });
    }
    let mut positions = Vec::with_capacity(updates.len());
    for update in updates {
        bounds.head += 1;
        let message = Arc::new(Message::new(bounds.head, update.track, update.json, now));
        txn.append(&message)?;
        positions.push(bounds.head);
        changes.push(Change::Appended(message));
    }
    if let (Some(key), Some(&first)) = (key, positions.first()) {
        let record = KeyRecord {
            time_ms: now,
            digest: key.digest().to_owned(),
            first,
            count: positions.len() as u64,
        };
        txn.put_idempotency_key(key.key(), &record)?;
    }
    Ok(Ok(Appended {
        positions,
        repeated: false,
    }))
}

/// Subscribes `uid` (created if new, its cursor at `head`) to each of `tracks` it does
/// not have yet, from `head` on; returns its tracks.
fn connect(
    txn: &mut impl StorageTxn,
    head: Position,
    uid: String,
    tracks: Vec<String>,
    now: u64,
    changes: &mut Vec<Change>,
) -> Result<Vec<String>> {
    let mut listener = txn.listener(&uid)?.unwrap_or_else(|| Listener {
        uid: uid.clone(),
        tracks: Vec::new(),
        cursor: head,
        last_seen_ms: now,
    });
    let uid: Arc<str> = uid.into();
    for track in tracks {
        if listener.tracks.iter().any(|s| s.track == track) {
            continue;
        }
        txn.set_subscribed(&track, &uid, true)?;
        changes.push(Change::Connected {
            uid: uid.clone(),
            track: track.as_str().into(),
        });
        listener.tracks.push(Subscription { track, since: head });
    }
    listener.last_seen_ms = now;
    txn.put_listener(&listener)?;
    Ok(listener.track_names())
}

/// Writes `acks` (a snapshot of the pending ones) into the listeners they belong to;
/// the acks of listeners forgotten meanwhile are dropped.
fn write_acks(txn: &mut impl StorageTxn, acks: &[(String, Ack)]) -> Result<()> {
    for (uid, ack) in acks {
        if let Some(mut listener) = txn.listener(uid)? {
            ack.apply_to(&mut listener);
            txn.put_listener(&listener)?;
        }
    }
    Ok(())
}

/// Takes `uid` off `track`, or forgets it; returns the tracks left (`None`: unknown).
fn disconnect(
    txn: &mut impl StorageTxn,
    uid: &str,
    track: Option<String>,
    changes: &mut Vec<Change>,
) -> Result<Option<Vec<String>>> {
    let Some(mut listener) = txn.listener(uid)? else {
        return Ok(None);
    };
    let gone: Vec<String> = match &track {
        Some(track) => listener
            .tracks
            .iter()
            .filter(|s| &s.track == track)
            .map(|s| s.track.clone())
            .collect(),
        None => listener.track_names(),
    };
    for name in &gone {
        txn.set_subscribed(name, uid, false)?;
    }
    listener.tracks.retain(|s| !gone.contains(&s.track));
    match track {
        Some(track) => {
            if !gone.is_empty() {
                changes.push(Change::Disconnected {
                    uid: uid.into(),
                    track: Some(track.into()),
                });
            }
            listener.last_seen_ms = now_ms();
            txn.put_listener(&listener)?;
            Ok(Some(listener.track_names()))
        }
        None => {
            txn.remove_listener(uid)?;
            changes.push(Change::Disconnected {
                uid: uid.into(),
                track: None,
            });
            Ok(Some(Vec::new()))
        }
    }
}
