//! Presence: which listeners are online — have an open stream on any node — and which
//! tracks are occupied (one of their subscribers is online); and the transitions of
//! both, reported once per cluster to a [`PresenceSink`] (the webhooks).
//!
//! - `local` — one node (memory or embedded engine): exact, read from this node's hub.
//! - `redis` — several nodes: each node writes its online uids and open tracks to Redis
//!   under a key that expires unless the node refreshes it, so a dead node's listeners
//!   go offline by themselves; one node at a time (a lease) reports the transitions.
//!
//! Presence looks only at the hub's *turns* (a uid's or track's first stream opened,
//! its last closed): it does nothing per message. It never blocks a stream or a
//! publish: the sink must hand events to a queue.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::engine;
use crate::hub::Hub;

mod local;
mod redis;

/// What presence reports, once per cluster, in order per listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    /// The listener's first stream opened, on any node.
    ListenerOnline {
        /// The listener.
        uid: String,
    },
    /// The listener's last stream closed, and it did not come back within the grace
    /// period (`Settings::presence_grace`): a reload or reconnect is neither an offline
    /// nor then an online.
    ListenerOffline {
        /// The listener.
        uid: String,
    },
    /// The track's first subscriber came online.
    TrackOccupied {
        /// The track.
        track: String,
    },
    /// The track's last online subscriber went (after the same grace period).
    TrackVacated {
        /// The track.
        track: String,
    },
}

/// Where presence reports its transitions (the webhooks' outbox).
pub trait PresenceSink: Send + Sync + 'static {
    /// Called with events in order; must not block (hand them to a queue).
    fn emit(&self, events: Vec<PresenceEvent>, time_ms: u64);
}

/// A sink that drops every event: for a server with no webhooks.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSink;

impl PresenceSink for NoSink {
    fn emit(&self, _events: Vec<PresenceEvent>, _time_ms: u64) {}
}

/// Who is online. Share it as `Arc<Presence>`; dropping it stops its tasks.
#[derive(Debug)]
pub struct Presence {
    backend: Backend,
    stop: CancellationToken,
}

#[derive(Debug)]
enum Backend {
    Local(Arc<Hub>),
    Redis(redis::RedisPresence),
}

impl Presence {
    /// Presence for one node: exact, from `hub`. Reports to `sink`, an offline after
    /// `grace`.
    pub fn start_local(hub: Arc<Hub>, sink: Arc<dyn PresenceSink>, grace: Duration) -> Self {
        let stop = CancellationToken::new();
        tokio::spawn(local::report(hub.clone(), sink, grace, stop.clone()));
        Self {
            backend: Backend::Local(hub),
            stop,
        }
    }

    /// Presence for a cluster sharing the Redis at `url`, keys under `prefix`: this
    /// node publishes what `hub` has open, and takes its turn at reporting to `sink`.
    pub async fn start_redis(
        url: &str,
        prefix: &str,
        hub: Arc<Hub>,
        sink: Arc<dyn PresenceSink>,
        grace: Duration,
    ) -> engine::Result<Self> {
        let stop = CancellationToken::new();
        let backend =
            redis::RedisPresence::start(url, prefix, hub, sink, grace, stop.clone()).await?;
        Ok(Self {
            backend: Backend::Redis(backend),
            stop,
        })
    }

    /// Whether each of `uids` has an open stream on any node, in the same order.
    pub async fn online(&self, uids: &[String]) -> engine::Result<Vec<bool>> {
        match &self.backend {
            Backend::Local(hub) => Ok(uids.iter().map(|uid| hub.online(uid) > 0).collect()),
            Backend::Redis(redis) => redis.online(uids).await,
        }
    }

    /// How many of `track`'s subscribers are online, when presence knows it without
    /// asking each (one node: exactly); `None` means ask [`Presence::online`] about each
    /// subscriber.
    pub fn online_in_track(&self, track: &str) -> Option<u64> {
        match &self.backend {
            Backend::Local(hub) => Some(hub.online_in_track(track) as u64),
            Backend::Redis(_) => None,
        }
    }

    /// Stops reporting and (on Redis) takes this node's listeners offline now rather
    /// than when its key expires.
    pub async fn close(&self) {
        self.stop.cancel();
        if let Backend::Redis(redis) = &self.backend {
            redis.leave().await;
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What has been reported online (listeners or tracks) and which of those are leaving:
/// gone, but still within their grace period.
#[derive(Debug, Default)]
struct Graces {
    reported: HashSet<Arc<str>>,
    leaving: HashMap<Arc<str>, Instant>,
}

impl Graces {
    /// `key` is online: true when that is news to report.
    fn arrive(&mut self, key: &Arc<str>) -> bool {
        self.leaving.remove(key);
        self.reported.insert(key.clone())
    }

    /// `key` is gone: if it was reported online, it is reported gone at `at` unless it
    /// arrives again before.
    fn leave(&mut self, key: &Arc<str>, at: Instant) {
        if self.reported.contains(key) {
            self.leaving.entry(key.clone()).or_insert(at);
        }
    }

    /// Those whose grace ran out by `now`: they are reported gone.
    fn due(&mut self, now: Instant) -> Vec<Arc<str>> {
        let mut due: Vec<(Instant, Arc<str>)> = Vec::new();
        self.leaving.retain(|key, at| {
            if *at <= now {
                due.push((*at, key.clone()));
                false
            } else {
                true
            }
        });
        // Those that left first are reported first.
        due.sort();
        due.into_iter()
            .map(|(_, key)| {
                self.reported.remove(&key);
                key
            })
            .collect()
    }

    /// When the next grace runs out.
    fn next_due(&self) -> Option<Instant> {
        self.leaving.values().min().copied()
    }
}

/// Reports to `sink`, when there is anything.
fn emit(sink: &dyn PresenceSink, events: Vec<PresenceEvent>) {
    if !events.is_empty() {
        sink.emit(events, engine::now_ms());
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
