//! Counters for `/metrics` (Prometheus text) and `/api/v1/stats` (JSON).
//!
//! Everything here is an atomic bump on the hot path; the store's counts (listeners,
//! tracks, messages) are read from the engine only when someone asks.
//!
//! The status page's chart also needs the recent past: [`History`] keeps the last
//! [`HISTORY_SAMPLES`] seconds of published and delivered counts, sampled once a second
//! off the hot path by a task that [`Metrics::keep_history`] starts.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::StoreCounts;

/// Seconds of history `/status` serves: the five minutes the status page's chart shows.
/// Two counts a second, so the whole ring is under 5 KB.
pub(crate) const HISTORY_SAMPLES: usize = 300;
/// One sample a second: fine enough to see the publish a person just made.
pub(crate) const HISTORY_EVERY: Duration = Duration::from_secs(1);

/// A listener transport; its name is the metric label (shared with `dolores bench`).
pub(crate) use dolores_protocol::Transport;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransportLabel {
    /// [`Transport::name`].
    transport: &'static str,
}

impl From<Transport> for TransportLabel {
    fn from(transport: Transport) -> Self {
        TransportLabel {
            transport: transport.name(),
        }
    }
}

/// The node's metrics. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    streams: Family<TransportLabel, Gauge>,
    published: Counter,
    delivered: Counter,
    store_latency: Histogram,
    listeners: Gauge,
    tracks: Gauge,
    stored: Gauge,
    history: Mutex<History>,
    /// The webhook sender's counters (zero while no `webhook_url` is set).
    pub webhooks: Arc<WebhookMetrics>,
}

/// The webhook sender's counters, shared with it.
#[derive(Debug, Default)]
pub struct WebhookMetrics {
    /// Events the app answered 2xx to.
    pub delivered: Counter,
    /// Tries that failed (an error, a timeout, a non-2xx answer).
    pub failed: Counter,
    /// Events dropped, oldest first, past `webhook_outbox_max`.
    pub dropped: Counter,
    /// Events waiting in the outbox (the cluster's, on Redis).
    pub pending: Gauge,
}

/// Messages published and delivered in each of the last [`HISTORY_SAMPLES`] samples,
/// oldest first. A bounded ring: the oldest sample goes when a new one comes.
#[derive(Debug, Default)]
pub(crate) struct History {
    /// The totals at the last sample, to count what happened since.
    totals: (u64, u64),
    /// When the last sample was taken, ms since the Unix epoch.
    until_ms: u64,
    published: VecDeque<u64>,
    delivered: VecDeque<u64>,
}

impl History {
    /// Records the totals as of `now_ms`: what grew since the last sample.
    fn push(&mut self, published: u64, delivered: u64, now_ms: u64) {
        let (last_published, last_delivered) = self.totals;
        self.published
            .push_back(published.saturating_sub(last_published));
        self.delivered
            .push_back(delivered.saturating_sub(last_delivered));
        while self.published.len() > HISTORY_SAMPLES {
            self.published.pop_front();
            self.delivered.pop_front();
        }
        self.totals = (published, delivered);
        self.until_ms = now_ms;
    }

    /// `{"every_seconds", "until_ms", "published": [n…], "delivered": [n…]}`, oldest
    /// first; the last sample ends at `until_ms`.
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "every_seconds": HISTORY_EVERY.as_secs(),
            "until_ms": self.until_ms,
            "published": self.published,
            "delivered": self.delivered,
        })
    }
}

/// Counts one open stream for as long as it lives.
#[derive(Debug)]
pub(crate) struct OpenStream(Gauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dolores");
        let streams = Family::<TransportLabel, Gauge>::default();
        let published = Counter::default();
        let delivered = Counter::default();
        // 100 µs to ~3 s: an fsync on a good disk to a very bad day.
        let store_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let (listeners, tracks, stored) = (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register(
            "connections",
            "Open listener streams by transport",
            streams.clone(),
        );
        registry.register(
            "listeners",
            "Listeners known to the store",
            listeners.clone(),
        );
        registry.register(
            "tracks",
            "Tracks with at least one subscriber",
            tracks.clone(),
        );
        registry.register(
            "messages_stored",
            "Messages kept in the log",
            stored.clone(),
        );
        registry.register(
            "messages_published",
            "Messages stored by update",
            published.clone(),
        );
        registry.register(
            "messages_delivered",
            "Messages written to listener streams",
            delivered.clone(),
        );
        registry.register(
            "store_commit_seconds",
            "Time to commit a group of writes to the store",
            store_latency.clone(),
        );
        let webhooks = Arc::new(WebhookMetrics::default());
        registry.register(
            "webhook_events_delivered",
            "Webhook events the app answered 2xx to",
            webhooks.delivered.clone(),
        );
        registry.register(
            "webhook_attempts_failed",
            "Webhook tries that failed (error, timeout, non-2xx); each is retried",
            webhooks.failed.clone(),
        );
        registry.register(
            "webhook_events_dropped",
            "Webhook events dropped, oldest first, past webhook_outbox_max",
            webhooks.dropped.clone(),
        );
        registry.register(
            "webhook_events_pending",
            "Webhook events waiting in the outbox",
            webhooks.pending.clone(),
        );
        // Every transport shows, at zero, before its first stream.
        for transport in Transport::ALL {
            drop(streams.get_or_create(&transport.into()));
        }
        Self {
            registry,
            streams,
            published,
            delivered,
            store_latency,
            listeners,
            tracks,
            stored,
            history: Mutex::default(),
            webhooks,
        }
    }
}

impl Metrics {
    /// Counts an open stream until the returned guard drops.
    pub(crate) fn open_stream(&self, transport: Transport) -> OpenStream {
        let gauge = self.streams.get_or_create(&transport.into()).clone();
        gauge.inc();
        OpenStream(gauge)
    }

    /// Open streams of one transport.
    pub(crate) fn open_streams(&self, transport: Transport) -> i64 {
        self.streams.get_or_create(&transport.into()).get()
    }

    /// Counts messages written to streams.
    pub(crate) fn delivered(&self, count: usize) {
        self.delivered.inc_by(count as u64);
    }

    /// Messages delivered so far.
    pub(crate) fn delivered_total(&self) -> u64 {
        self.delivered.get()
    }

    /// Counts a commit of `published` messages that took `seconds`.
    pub(crate) fn committed(&self, published: usize, seconds: f64) {
        self.published.inc_by(published as u64);
        self.store_latency.observe(seconds);
    }

    /// Messages published so far.
    pub(crate) fn published_total(&self) -> u64 {
        self.published.get()
    }

    /// Takes one sample of the history (see [`History`]).
    pub(crate) fn sample_history(&self, now_ms: u64) {
        let (published, delivered) = (self.published_total(), self.delivered_total());
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(published, delivered, now_ms);
    }

    /// The recent history as JSON, for `/status`.
    pub(crate) fn history_json(&self) -> serde_json::Value {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .json()
    }

    /// Samples the history every [`HISTORY_EVERY`] until `shutdown`, or until the
    /// metrics are dropped (the task holds them weakly, so it never keeps them alive).
    pub(crate) fn keep_history(metrics: &Arc<Metrics>, shutdown: CancellationToken) {
        let metrics: Weak<Metrics> = Arc::downgrade(metrics);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HISTORY_EVERY);
            // A late tick (a busy machine) folds its counts into the next sample.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(metrics) = metrics.upgrade() else {
                    return;
                };
                metrics.sample_history(crate::engine::now_ms());
            }
        });
    }

    /// The Prometheus text exposition, with the store's counts as of now.
    pub(crate) fn render(&self, counts: StoreCounts) -> String {
        self.listeners.set(counts.listeners as i64);
        self.tracks.set(counts.tracks as i64);
        self.stored.set(counts.messages as i64);
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_counts_what_happened_in_each_sample_and_keeps_five_minutes() {
        let metrics = Metrics::default();
        metrics.sample_history(1_000);
        metrics.committed(3, 0.001);
        metrics.delivered(5);
        metrics.sample_history(2_000);
        metrics.sample_history(3_000);
        let json = metrics.history_json();
        assert_eq!(json["published"], serde_json::json!([0, 3, 0]));
        assert_eq!(json["delivered"], serde_json::json!([0, 5, 0]));
        assert_eq!(json["until_ms"], 3_000);
        for second in 0..HISTORY_SAMPLES as u64 + 10 {
            metrics.committed(1, 0.001);
            metrics.sample_history(4_000 + second * 1_000);
        }
        let json = metrics.history_json();
        let published = json["published"].as_array().expect("an array");
        assert_eq!(published.len(), HISTORY_SAMPLES);
        assert!(published.iter().all(|n| n == 1), "{published:?}");
        assert_eq!(
            json["delivered"].as_array().map(Vec::len),
            Some(HISTORY_SAMPLES)
        );
    }
}
