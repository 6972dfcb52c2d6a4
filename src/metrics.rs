//! Counters for `/metrics` (Prometheus text) and `/api/v1/stats` (JSON).
//!
//! Everything here is an atomic bump on the hot path; the store's counts (listeners,
//! tracks, messages) are read from the engine only when someone asks.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::StoreCounts;

/// A listener transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Server-Sent Events.
    Sse,
    /// WebSocket.
    Ws,
    /// Long-polling.
    Poll,
}

impl Transport {
    /// Its name in URLs, stats and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
            Transport::Poll => "poll",
        }
    }
}

impl EncodeLabelValue for Transport {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransportLabel {
    transport: Transport,
}

/// The node's metrics. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    streams: Family<TransportLabel, Gauge>,
    published: Counter,
    delivered: Counter,
    store_latency: Histogram,
    listeners: Gauge,
    tracks: Gauge,
    stored: Gauge,
}

/// Counts one open stream for as long as it lives.
#[derive(Debug)]
pub struct OpenStream(Gauge);

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
        // Every transport shows, at zero, before its first stream.
        for transport in [Transport::Sse, Transport::Ws, Transport::Poll] {
            drop(streams.get_or_create(&TransportLabel { transport }));
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
        }
    }
}

impl Metrics {
    /// Counts an open stream until the returned guard drops.
    pub fn open_stream(&self, transport: Transport) -> OpenStream {
        let gauge = self
            .streams
            .get_or_create(&TransportLabel { transport })
            .clone();
        gauge.inc();
        OpenStream(gauge)
    }

    /// Open streams of one transport.
    pub fn open_streams(&self, transport: Transport) -> i64 {
        self.streams
            .get_or_create(&TransportLabel { transport })
            .get()
    }

    /// Counts messages written to streams.
    pub fn delivered(&self, count: usize) {
        self.delivered.inc_by(count as u64);
    }

    /// Messages delivered so far.
    pub fn delivered_total(&self) -> u64 {
        self.delivered.get()
    }

    /// Counts a commit of `published` messages that took `seconds`.
    pub fn committed(&self, published: usize, seconds: f64) {
        self.published.inc_by(published as u64);
        self.store_latency.observe(seconds);
    }

    /// Messages published so far.
    pub fn published_total(&self) -> u64 {
        self.published.get()
    }

    /// The Prometheus text exposition, with the store's counts as of now.
    pub fn render(&self, counts: StoreCounts) -> String {
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
