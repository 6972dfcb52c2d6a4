//! Webhooks (`--webhook-url`): tells the app when listeners come and go, by POSTing
//! signed JSON events `{"id", "type", "time", "data"}`.
//!
//! An event goes: [`Webhooks::emit`] (never blocks: it stages the event in memory) →
//! a writer task that appends it to the outbox (`outbox`; durable on the embedded engine and
//! on Redis) → the sender in `deliver`, which POSTs it, retries it, and removes it
//! once the app answered 2xx. Nothing here runs on a publish's or a delivery's path.
//!
//! - `outbox` — the `Outbox` seam and the in-memory outbox;
//! - `embedded` — `webhooks.redb` in the data dir, which also keeps who stands reported
//!   online, for presence after a crash ([`crate::presence::PresenceSink::reported_online`]);
//! - `redis` — a Stream shared by the cluster, sent by one node at a time (a lease);
//! - `deliver` — the sender: lanes, concurrency, backoff;
//! - [`sign`] — the `Dolores-Signature` header.
//!
//! Without a `webhook_secret`, events are signed with the api key: the app already
//! holds it, so it can check every event without another secret to configure, and
//! an event is never sent unsigned.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::metrics::WebhookMetrics;
use crate::presence::PresenceEvent;

mod deliver;
mod embedded;
pub(crate) mod outbox;
mod redis;
pub(crate) mod sign;

use outbox::{Entry, Outbox, Staged};

/// Most staged events written to the outbox in one write: bounds one commit.
const WRITE_BATCH: usize = 1000;
/// The wait before writing again after the outbox refused a write (a full disk, Redis
/// away): the events stay staged meanwhile, within the bound.
const WRITE_RETRY: Duration = Duration::from_secs(1);
/// Dropped events are reported at most this often, with how many went since.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(60);
/// How long `close` waits for staged events to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What happened, as the app hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A listener's first stream opened, on any node.
    ListenerOnline,
    /// A listener's last stream closed, and the grace passed without a new one.
    ListenerOffline,
    /// A track's first subscriber came online.
    TrackOccupied,
    /// A track's last online subscriber went.
    TrackVacated,
}

impl Kind {
    /// The event's `type`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::ListenerOnline => "listener.online",
            Kind::ListenerOffline => "listener.offline",
            Kind::TrackOccupied => "track.occupied",
            Kind::TrackVacated => "track.vacated",
        }
    }

    /// The field of `data` that names the subject: `uid` or `track`.
    fn field(self) -> &'static str {
        match self {
            Kind::ListenerOnline | Kind::ListenerOffline => "uid",
            Kind::TrackOccupied | Kind::TrackVacated => "track",
        }
    }
}

/// Sends webhook events for this node. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Webhooks {
    staged: Mutex<VecDeque<Staged>>,
    max: u64,
    outbox: Arc<dyn Outbox>,
    write_wake: Notify,
    send_wake: Arc<Notify>,
    metrics: Arc<WebhookMetrics>,
    drops: Mutex<DropReport>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// Dropped events not yet reported.
#[derive(Debug, Default)]
struct DropReport {
    unreported: u64,
    last: Option<Instant>,
}

impl Webhooks {
    /// Starts sending to `settings.webhook_url`, or `None` when it is not set. The
    /// outbox is the engine's kind: in memory, in the data dir, or in Redis.
    pub async fn open(
        settings: &Settings,
        api_key: &str,
        metrics: Arc<WebhookMetrics>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(url) = &settings.webhook_url else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(url)?;
        let max = settings.webhook_outbox_max;
        let outbox: Arc<dyn Outbox> = if let Some(redis) = &settings.redis {
            Arc::new(redis::RedisOutbox::open(redis, &settings.redis_prefix, max).await?)
        } else if settings.memory {
            Arc::new(outbox::MemoryOutbox::new(max))
        } else {
            Arc::new(embedded::RedbOutbox::open(&settings.data, max)?)
        };
        let secret = settings
            .webhook_secret
            .clone()
            .unwrap_or_else(|| api_key.to_owned());
        let target = deliver::Target::new(
            url,
            secret,
            settings.webhook_timeout,
            settings.webhook_max_backoff,
            metrics.clone(),
        )?;
        Ok(Some(Self::start(outbox, max, target, metrics)))
    }

    fn start(
        outbox: Arc<dyn Outbox>,
        max: u64,
        target: deliver::Target,
        metrics: Arc<WebhookMetrics>,
    ) -> Arc<Self> {
        let webhooks = Arc::new(Self {
            staged: Mutex::default(),
            max,
            outbox: outbox.clone(),
            write_wake: Notify::new(),
            send_wake: Arc::new(Notify::new()),
            metrics,
            drops: Mutex::default(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        webhooks.tasks.spawn(Self::write(webhooks.clone()));
        webhooks.tasks.spawn(deliver::run(
            outbox,
            Arc::new(target),
            webhooks.send_wake.clone(),
            webhooks.stop.clone(),
        ));
        webhooks
    }

    /// Hands events that happened at `time_ms` (ms since the epoch) to the outbox, in
    /// order. Never blocks: they are staged and written by a task of their own; past
    /// `webhook_outbox_max` staged, the oldest are dropped (and counted).
    pub fn emit(&self, events: impl IntoIterator<Item = (Kind, String)>, time_ms: u64) {
        let time = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(time_ms),
        )
        .to_string();
        let mut dropped = 0;
        {
            let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
            for (kind, subject) in events {
                // A listener's events go out in order, and a track's: one lane each.
                let lane = match kind {
                    Kind::ListenerOnline | Kind::ListenerOffline => format!("l:{subject}"),
                    Kind::TrackOccupied | Kind::TrackVacated => format!("t:{subject}"),
                };
                let mut data = serde_json::Map::new();
                data.insert(kind.field().to_owned(), subject.into());
                let body = serde_json::json!({
                    "id": event_id(),
                    "type": kind.name(),
                    "time": time,
                    "data": data,
                });
                staged.push_back(Staged {
                    kind,
                    entry: Entry {
                        lane,
                        body: body.to_string(),
                    },
                });
                if staged.len() as u64 > self.max {
                    staged.pop_front();
                    dropped += 1;
                }
            }
        }
        self.dropped(dropped);
        self.write_wake.notify_one();
    }

    /// Counts and (at most once a minute) reports events dropped past the bound.
    fn dropped(&self, count: u64) {
        if count == 0 {
            return;
        }
        self.metrics.dropped.inc_by(count);
        let mut report = self.drops.lock().unwrap_or_else(PoisonError::into_inner);
        report.unreported += count;
        if report
            .last
            .is_none_or(|at| at.elapsed() >= DROP_REPORT_EVERY)
        {
            tracing::warn!(
                "the webhook outbox is full ({} events, webhook_outbox_max): dropped the {} oldest \
                 (said at most once a minute; dolores_webhook_events_dropped_total counts them all)",
                self.max,
                report.unreported
            );
            report.unreported = 0;
            report.last = Some(Instant::now());
        }
    }

    /// The writer: staged events into the outbox, in order.
    async fn write(self: Arc<Self>) {
        loop {
            let stopping = tokio::select! {
                () = self.stop.cancelled() => true,
                () = self.write_wake.notified() => false,
            };
            self.write_staged(stopping).await;
            if stopping {
                return;
            }
        }
    }

    async fn write_staged(&self, stopping: bool) {
        loop {
            let batch: Vec<Staged> = {
                let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
                let n = staged.len().min(WRITE_BATCH);
                staged.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            match self.outbox.push(batch.clone()).await {
                Ok(dropped) => {
                    self.dropped(dropped);
                    self.send_wake.notify_one();
                    if let Ok(len) = self.outbox.len().await {
                        self.metrics.pending.set(len as i64);
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot write webhook events to the outbox: {e}; retrying");
                    let mut dropped = 0;
                    {
                        let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
                        for entry in batch.into_iter().rev() {
                            staged.push_front(entry);
                        }
                        while staged.len() as u64 > self.max {
                            staged.pop_front();
                            dropped += 1;
                        }
                    }
                    self.dropped(dropped);
                    if stopping {
                        return;
                    }
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(WRITE_RETRY) => {}
                    }
                }
            }
        }
    }

    /// Writes what is staged (waiting at most `CLOSE_WAIT`, 2 s) and stops sending.
    pub async fn close(&self) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(CLOSE_WAIT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("webhook events still being written at shutdown; they may be lost");
        }
    }
}

impl crate::presence::PresenceSink for Webhooks {
    fn emit(&self, events: Vec<PresenceEvent>, time_ms: u64) {
        Webhooks::emit(
            self,
            events.into_iter().map(|event| match event {
                PresenceEvent::ListenerOnline { uid } => (Kind::ListenerOnline, uid),
                PresenceEvent::ListenerOffline { uid } => (Kind::ListenerOffline, uid),
                PresenceEvent::TrackOccupied { track } => (Kind::TrackOccupied, track),
                PresenceEvent::TrackVacated { track } => (Kind::TrackVacated, track),
            }),
            time_ms,
        );
    }

    fn reported_online(&self) -> (Vec<String>, Vec<String>) {
        let reported = self.outbox.reported_at_open();
        (reported.uids, reported.tracks)
    }
}

/// A new event id: `evt_` and 128 random bits in hex, unique without coordination
/// between nodes or restarts (the receiver deduplicates by it).
fn event_id() -> String {
    let bits: [u8; 16] = rand::random();
    let hex: String = bits.iter().map(|b| format!("{b:02x}")).collect();
    format!("evt_{hex}")
}
