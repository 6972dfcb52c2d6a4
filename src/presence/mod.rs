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
pub(crate) enum PresenceEvent {
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
pub(crate) trait PresenceSink: Send + Sync + 'static {
    /// Called with events in order; must not block (hand them to a queue).
    fn emit(&self, events: Vec<PresenceEvent>, time_ms: u64);

    /// `(uids, tracks)` a previous run of this node reported online / occupied and never
    /// offline / vacated (it was killed): one node's presence starts from them. Called
    /// once, when presence starts. A sink that keeps nothing across restarts has none.
    fn reported_online(&self) -> (Vec<String>, Vec<String>) {
        (Vec::new(), Vec::new())
    }
}

/// A sink that drops every event: for a server with no webhooks.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NoSink;

impl PresenceSink for NoSink {
    fn emit(&self, _events: Vec<PresenceEvent>, _time_ms: u64) {}
}

/// Who is online. Share it as `Arc<Presence>`; dropping it stops its tasks.
#[derive(Debug)]
pub(crate) struct Presence {
    backend: Backend,
    stop: CancellationToken,
    /// The one-node reporter, awaited by `close` so its last events are out.
    reporter: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Debug)]
enum Backend {
    Local(Arc<Hub>),
    Redis(Box<redis::RedisPresence>),
}

impl Presence {
    /// Presence for one node: exact, from `hub`. Reports to `sink`, an offline after
    /// `grace`.
    pub(crate) fn start_local(hub: Arc<Hub>, sink: Arc<dyn PresenceSink>, grace: Duration) -> Self {
        let stop = CancellationToken::new();
        let reporter = tokio::spawn(local::report(hub.clone(), sink, grace, stop.clone()));
        Self {
            backend: Backend::Local(hub),
            stop,
            reporter: std::sync::Mutex::new(Some(reporter)),
        }
    }

    /// Presence for a cluster sharing the Redis at `url`, keys under `prefix`: this
    /// node publishes what `hub` has open, and takes its turn at reporting to `sink`.
    pub(crate) async fn start_redis(
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
            backend: Backend::Redis(Box::new(backend)),
            stop,
            reporter: std::sync::Mutex::new(None),
        })
    }

    /// Whether each of `uids` has an open stream on any node, in the same order.
    pub(crate) async fn online(&self, uids: &[String]) -> engine::Result<Vec<bool>> {
        match &self.backend {
            Backend::Local(hub) => Ok(uids.iter().map(|uid| hub.online(uid) > 0).collect()),
            Backend::Redis(redis) => redis.online(uids).await,
        }
    }

    /// How many listeners are online: on one node exactly; on Redis, those the reporter
    /// last reported online (one that left counts until its grace ran out).
    pub(crate) async fn online_count(&self) -> engine::Result<u64> {
        match &self.backend {
            Backend::Local(hub) => Ok(hub.online_count() as u64),
            Backend::Redis(redis) => redis.reported_count().await,
        }
    }

    /// How many of `track`'s subscribers are online, when presence knows it without
    /// asking each (one node: exactly); `None` means ask [`Presence::online`] about each
    /// subscriber.
    pub(crate) fn online_in_track(&self, track: &str) -> Option<u64> {
        match &self.backend {
            Backend::Local(hub) => Some(hub.online_in_track(track) as u64),
            Backend::Redis(_) => None,
        }
    }

    /// Stops reporting. One node: what it reported online is reported gone now (the
    /// node's streams are closed: nobody is online on it any more); returns once that
    /// is handed to the sink. Redis: takes this node's listeners offline now rather than when its keys
    /// expire; the reporter of the cluster says so, after the grace.
    pub(crate) async fn close(&self) {
        self.stop.cancel();
        let reporter = self
            .reporter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(reporter) = reporter {
            let _ = reporter.await;
        }
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
/// gone, but still within their grace period. The leaving are kept in deadline order too,
/// so that a wake-up costs what is due, not a scan of everyone leaving (10,000 streams
/// closing at once would otherwise cost 10,000² steps).
#[derive(Debug, Default)]
struct Graces {
    reported: HashSet<Arc<str>>,
    leaving: HashMap<Arc<str>, Instant>,
    by_deadline: std::collections::BTreeSet<(Instant, Arc<str>)>,
}

impl Graces {
    /// `key` is online: true when that is news to report.
    fn arrive(&mut self, key: &Arc<str>) -> bool {
        if let Some(at) = self.leaving.remove(key) {
            self.by_deadline.remove(&(at, key.clone()));
        }
        self.reported.insert(key.clone())
    }

    /// `keys` were reported online by a previous run and are not known to be here: each
    /// is reported gone at `at` unless it arrives before (then it is no news).
    fn reported_before(&mut self, keys: Vec<String>, at: Instant) {
        for key in keys {
            let key: Arc<str> = key.into();
            self.reported.insert(key.clone());
            self.start_leaving(key, at);
        }
    }

    /// `key` is gone: if it was reported online, it is reported gone at `at` unless it
    /// arrives again before.
    fn leave(&mut self, key: &Arc<str>, at: Instant) {
        if self.reported.contains(key) {
            self.start_leaving(key.clone(), at);
        }
    }

    /// Puts `key` among the leaving at `at`, unless it is leaving already (its first
    /// deadline stands).
    fn start_leaving(&mut self, key: Arc<str>, at: Instant) {
        if let std::collections::hash_map::Entry::Vacant(entry) = self.leaving.entry(key.clone()) {
            entry.insert(at);
            self.by_deadline.insert((at, key));
        }
    }

    /// Those whose grace ran out by `now`, those that left first first: they are
    /// reported gone.
    fn due(&mut self, now: Instant) -> Vec<Arc<str>> {
        let mut due = Vec::new();
        while let Some((at, _)) = self.by_deadline.first()
            && *at <= now
        {
            let Some((_, key)) = self.by_deadline.pop_first() else {
                break;
            };
            self.leaving.remove(&key);
            self.reported.remove(&key);
            due.push(key);
        }
        due
    }

    /// When the next grace runs out.
    fn next_due(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(at, _)| *at)
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use PresenceEvent::{ListenerOffline, ListenerOnline, TrackOccupied, TrackVacated};

    #[derive(Default)]
    struct RecordingSink(Mutex<Vec<PresenceEvent>>);

    impl PresenceSink for RecordingSink {
        fn emit(&self, events: Vec<PresenceEvent>, _time_ms: u64) {
            self.0.lock().expect("lock").extend(events);
        }
    }

    impl RecordingSink {
        fn events(&self) -> Vec<PresenceEvent> {
            self.0.lock().expect("lock").clone()
        }
    }

    fn online(uid: &str) -> PresenceEvent {
        ListenerOnline { uid: uid.into() }
    }

    fn offline(uid: &str) -> PresenceEvent {
        ListenerOffline { uid: uid.into() }
    }

    fn occupied(track: &str) -> PresenceEvent {
        TrackOccupied {
            track: track.into(),
        }
    }

    fn vacated(track: &str) -> PresenceEvent {
        TrackVacated {
            track: track.into(),
        }
    }

    /// Waits (bounded) until `sinks` together heard exactly `expected`, then a little
    /// longer to be sure nothing more comes.
    async fn heard(sinks: &[&RecordingSink], expected: &[PresenceEvent], settle: Duration) {
        let all = || -> Vec<PresenceEvent> { sinks.iter().flat_map(|s| s.events()).collect() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while all().len() < expected.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(settle).await;
        assert_eq!(all(), expected);
    }

    #[tokio::test]
    async fn one_node_reports_each_transition_once_and_a_reconnect_within_the_grace_not_at_all() {
        let hub = Arc::new(Hub::default());
        let sink = Arc::new(RecordingSink::default());
        let presence = Presence::start_local(hub.clone(), sink.clone(), Duration::from_millis(150));
        let stream = hub.subscribe("listener-1");
        stream.add_tracks(["rooms/1"]);
        let second = hub.subscribe("listener-1");
        heard(
            &[&sink],
            &[online("listener-1"), occupied("rooms/1")],
            Duration::ZERO,
        )
        .await;
        // A reload: the last stream closes and a new one opens within the grace.
        drop((stream, second));
        let again = hub.subscribe("listener-1");
        again.add_tracks(["rooms/1"]);
        heard(
            &[&sink],
            &[online("listener-1"), occupied("rooms/1")],
            Duration::from_millis(300),
        )
        .await;
        let strings = |uids: &[&str]| uids.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            presence
                .online(&strings(&["listener-1", "listener-2"]))
                .await
                .expect("online"),
            [true, false]
        );
        assert_eq!(presence.online_in_track("rooms/1"), Some(1));
        drop(again);
        heard(
            &[&sink],
            &[
                online("listener-1"),
                occupied("rooms/1"),
                vacated("rooms/1"),
                offline("listener-1"),
            ],
            Duration::from_millis(100),
        )
        .await;
        // The node stops with a listener online: it is reported gone at once.
        let last = hub.subscribe("listener-2");
        let before = sink.events().len();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.events().len() == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        presence.close().await;
        assert_eq!(
            sink.events()[before..],
            [online("listener-2"), offline("listener-2")]
        );
        drop(last);
    }

    /// A sink a previous run of the node reported to: it remembers who stands reported.
    #[derive(Default)]
    struct RememberingSink {
        heard: RecordingSink,
        uids: Vec<String>,
        tracks: Vec<String>,
    }

    impl PresenceSink for RememberingSink {
        fn emit(&self, events: Vec<PresenceEvent>, time_ms: u64) {
            self.heard.emit(events, time_ms);
        }

        fn reported_online(&self) -> (Vec<String>, Vec<String>) {
            (self.uids.clone(), self.tracks.clone())
        }
    }

    #[tokio::test]
    async fn one_node_restarted_reports_gone_whom_it_reported_before_unless_they_come_back() {
        let hub = Arc::new(Hub::default());
        let sink = Arc::new(RememberingSink {
            uids: vec!["gone".into(), "back".into()],
            tracks: vec!["rooms/gone".into(), "rooms/back".into()],
            ..RememberingSink::default()
        });
        let presence = Presence::start_local(hub.clone(), sink.clone(), Duration::from_millis(150));
        let back = hub.subscribe("back");
        back.add_tracks(["rooms/back"]);
        heard(
            &[&sink.heard],
            &[vacated("rooms/gone"), offline("gone")],
            Duration::from_millis(300),
        )
        .await;
        presence.close().await;
        drop(back);
    }

    fn redis_url() -> String {
        std::env::var("DOLORES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_nodes_report_each_transition_once_per_cluster() {
        let prefix = format!(
            "dolores-test-presence-{}-{}",
            std::process::id(),
            engine::now_ms()
        );
        let grace = Duration::from_millis(200);
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let hub = Arc::new(Hub::default());
            let sink = Arc::new(RecordingSink::default());
            let presence =
                Presence::start_redis(&redis_url(), &prefix, hub.clone(), sink.clone(), grace)
                    .await
                    .expect("redis presence (is redis-server running?)");
            nodes.push((hub, sink, presence));
        }
        let sinks: Vec<&RecordingSink> = nodes.iter().map(|(_, s, _)| &**s).collect();
        // The same listener on two nodes, then on none: one online, one offline.
        let on_a = nodes[0].0.subscribe("listener-1");
        on_a.add_tracks(["rooms/1"]);
        let on_b = nodes[1].0.subscribe("listener-1");
        on_b.add_tracks(["rooms/1"]);
        heard(
            &sinks,
            &[online("listener-1"), occupied("rooms/1")],
            Duration::from_millis(600),
        )
        .await;
        let uids = ["listener-1".to_owned(), "listener-2".to_owned()];
        assert_eq!(
            nodes[2].2.online(&uids).await.expect("online"),
            [true, false]
        );
        drop(on_a);
        // Moves to the third node within the grace: nothing to report.
        let on_c = nodes[2].0.subscribe("listener-1");
        on_c.add_tracks(["rooms/1"]);
        drop(on_b);
        heard(
            &sinks,
            &[online("listener-1"), occupied("rooms/1")],
            Duration::from_millis(600),
        )
        .await;
        drop(on_c);
        heard(
            &sinks,
            &[
                online("listener-1"),
                occupied("rooms/1"),
                vacated("rooms/1"),
                offline("listener-1"),
            ],
            Duration::from_millis(600),
        )
        .await;
        assert_eq!(
            nodes[0].2.online(&uids).await.expect("online"),
            [false, false]
        );
        // A node that dies says nothing: its keys expire and another node reports.
        let on_dying = nodes[1].0.subscribe("listener-3");
        let before = sinks.iter().map(|s| s.events().len()).sum::<usize>();
        let all = |sinks: &[&RecordingSink]| -> Vec<PresenceEvent> {
            sinks.iter().flat_map(|s| s.events()).collect()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while all(&sinks).len() == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(all(&sinks)[before..], [online("listener-3")]);
        drop(sinks);
        // Its tasks stop; its keys stay until they expire (no `close`).
        let (_, dying_sink, dying) = nodes.remove(1);
        drop(dying);
        let sinks: Vec<&RecordingSink> = nodes
            .iter()
            .map(|(_, s, _)| &**s)
            .chain([&*dying_sink])
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all(&sinks).contains(&offline("listener-3")) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Once: the sinks' order changed, so count rather than slice.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let events = all(&sinks);
        assert_eq!(events.len(), before + 2, "{events:?}");
        let offline_3 = events.iter().filter(|e| **e == offline("listener-3"));
        assert_eq!(offline_3.count(), 1, "{events:?}");
        drop(on_dying);
        for (_, _, presence) in &nodes {
            presence.close().await;
        }
    }
}
