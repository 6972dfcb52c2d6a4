//! Presence across nodes sharing one Redis.
//!
//! What Redis holds (under the engine's prefix):
//!
//! - `presence:n:{node}:u` / `…:t` — the uids with a stream open on that node, and the
//!   tracks such streams receive. The node writes each turn as it happens and refreshes
//!   both keys' expiry every [`HEARTBEAT`]; they expire after [`NODE_TTL`] without it,
//!   so a dead node's listeners go offline by themselves within that bound.
//! - `presence:nodes` — node ids by last heartbeat (ms), to find the sets.
//! - `presence:leader` — a lease ([`LEASE`]): the node holding it is the one that
//!   reports transitions, so each is reported once per cluster, not once per node.
//! - `presence:reported:u` / `…:t` — what the reporter last said is online, so a new
//!   reporter (the old one died) carries on from there instead of starting over.
//!
//! Why a lease and a diff, not per-transition Lua: a node that dies takes its turns
//! with it, and only a diff against what is still alive notices; the diff runs in
//! Redis and returns only what changed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::RedisConnection;
use redis::Script;
use tokio_util::sync::CancellationToken;

use super::{PresenceEvent, PresenceSink, emit, until};
use crate::engine::{self, EngineError, now_ms};
use crate::hub::Hub;

/// How often a node refreshes its keys, and the reporter its lease.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node's keys live this long without a heartbeat: three heartbeats, so one slow
/// round trip does not take a live node's listeners offline. This is the bound on how
/// long a dead node's listeners still count as online.
pub(crate) const NODE_TTL: Duration = Duration::from_secs(3);
/// The reporter's lease: as long as a node's keys, so a dead reporter is replaced
/// within the same bound.
const LEASE: Duration = Duration::from_secs(3);
/// How often the reporter diffs the cluster: the delay a transition may add on top of
/// the node's own write.
const REPORT_EVERY: Duration = Duration::from_millis(250);
/// A node id unseen this long is dropped from `presence:nodes` by the reporter (its
/// keys expired long before): restarts leave no trail.
const FORGET_NODE_AFTER: Duration = Duration::from_secs(60);

/// Takes or renews the lease: 1 when this node (ARGV[1]) holds it.
const LEASE_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
";

/// KEYS: reported uids, reported tracks, scratch uids, scratch tracks, the epoch, then
/// the nodes' uid sets and track sets (ARGV[1] of each). ARGV[2] is the epoch and
/// ARGV[3] the number of uid sets alive at the last diff, ARGV[4] '1' to diff anyway.
/// Returns whether it diffed, the epoch and the sets alive now, then the uids that came
/// and went and the tracks that came and went, relative to what was reported. It diffs
/// only when a node wrote (the epoch moved) or a node's sets expired (fewer alive): a
/// quiet cluster costs a `GET` and an `EXISTS` a tick, not a union of every set.
const DIFF_SCRIPT: &str = r"
local n = tonumber(ARGV[1])
local u, t = {}, {}
for i = 1, n do u[#u + 1] = KEYS[5 + i]; t[#t + 1] = KEYS[5 + n + i] end
local epoch = redis.call('GET', KEYS[5]) or '0'
local alive = 0
if n > 0 then alive = redis.call('EXISTS', unpack(u)) end
if ARGV[4] ~= '1' and epoch == ARGV[2] and alive == tonumber(ARGV[3]) then
  return {0, epoch, alive, {}, {}, {}, {}}
end
redis.call('DEL', KEYS[3], KEYS[4])
if n > 0 then
  redis.call('SUNIONSTORE', KEYS[3], unpack(u))
  redis.call('SUNIONSTORE', KEYS[4], unpack(t))
end
local r = {
  1, epoch, alive,
  redis.call('SDIFF', KEYS[3], KEYS[1]), redis.call('SDIFF', KEYS[1], KEYS[3]),
  redis.call('SDIFF', KEYS[4], KEYS[2]), redis.call('SDIFF', KEYS[2], KEYS[4]),
}
redis.call('DEL', KEYS[3], KEYS[4])
return r
";

#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
    nodes: String,
    leader: String,
    reported_uids: String,
    reported_tracks: String,
    scratch_uids: String,
    scratch_tracks: String,
    epoch: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let prefix = format!("{}presence:", engine::key_prefix(prefix));
        Self {
            nodes: format!("{prefix}nodes"),
            leader: format!("{prefix}leader"),
            reported_uids: format!("{prefix}reported:u"),
            reported_tracks: format!("{prefix}reported:t"),
            scratch_uids: format!("{prefix}scratch:u"),
            scratch_tracks: format!("{prefix}scratch:t"),
            epoch: format!("{prefix}epoch"),
            prefix,
        }
    }

    fn node_uids(&self, node: &str) -> String {
        format!("{}n:{node}:u", self.prefix)
    }

    fn node_tracks(&self, node: &str) -> String {
        format!("{}n:{node}:t", self.prefix)
    }
}

fn redis_error(e: redis::RedisError) -> EngineError {
    EngineError::Storage(format!("redis presence: {e}"))
}

/// This node's side of cluster presence.
pub(super) struct RedisPresence {
    conn: RedisConnection,
    keys: Keys,
    node: String,
}

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence")
            .field("node", &self.node)
            .finish()
    }
}

impl RedisPresence {
    /// Connects, and starts publishing `hub`'s open streams and taking turns at
    /// reporting to `sink`, until `stop`.
    pub(super) async fn start(
        url: &str,
        prefix: &str,
        hub: Arc<Hub>,
        sink: Arc<dyn PresenceSink>,
        grace: Duration,
        stop: CancellationToken,
    ) -> engine::Result<Self> {
        let conn = engine::connect_redis(url).await?;
        let keys = Keys::new(prefix);
        // Unique per process: a restarted node starts with empty sets.
        let node = format!("{:016x}", rand::random::<u64>());
        hub.watch();
        tokio::spawn(publish(
            conn.clone(),
            keys.clone(),
            node.clone(),
            hub,
            stop.clone(),
        ));
        tokio::spawn(report(
            conn.clone(),
            keys.clone(),
            node.clone(),
            sink,
            grace,
            stop,
        ));
        Ok(Self { conn, keys, node })
    }

    /// Whether each of `uids` is in the set of some node whose keys are alive.
    pub(super) async fn online(&self, uids: &[String]) -> engine::Result<Vec<bool>> {
        let mut online = vec![false; uids.len()];
        if uids.is_empty() {
            return Ok(online);
        }
        let mut conn = self.conn.clone();
        let nodes = live_nodes(&mut conn, &self.keys).await?;
        if nodes.is_empty() {
            return Ok(online);
        }
        let mut pipe = redis::pipe();
        for node in &nodes {
            pipe.cmd("SMISMEMBER")
                .arg(self.keys.node_uids(node))
                .arg(uids);
        }
        let answers: Vec<Vec<bool>> = pipe.query_async(&mut conn).await.map_err(redis_error)?;
        for answer in answers {
            for (online, member) in online.iter_mut().zip(answer) {
                *online |= member;
            }
        }
        Ok(online)
    }

    /// How many listeners the reporter last reported online: one `SCARD`, cheap enough
    /// for a status page that asks every second.
    pub(super) async fn reported_count(&self) -> engine::Result<u64> {
        redis::cmd("SCARD")
            .arg(&self.keys.reported_uids)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)
    }

    /// Takes this node's listeners offline now (a clean shutdown), and gives up the
    /// lease if it holds it.
    pub(super) async fn leave(&self) {
        let mut conn = self.conn.clone();
        let result: redis::RedisResult<()> = redis::pipe()
            .cmd("DEL")
            .arg(self.keys.node_uids(&self.node))
            .arg(self.keys.node_tracks(&self.node))
            .ignore()
            .cmd("ZREM")
            .arg(&self.keys.nodes)
            .arg(&self.node)
            .ignore()
            .query_async(&mut conn)
            .await;
        if let Err(e) = result {
            tracing::warn!("cannot take this node's listeners offline in redis: {e}");
        }
        let release = Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end return 0",
        );
        let _: redis::RedisResult<i64> = release
            .key(&self.keys.leader)
            .arg(&self.node)
            .invoke_async(&mut conn)
            .await;
    }
}

/// Node ids seen within [`FORGET_NODE_AFTER`]; a dead one's sets have expired, so
/// asking them costs a little and answers nothing.
async fn live_nodes(conn: &mut RedisConnection, keys: &Keys) -> engine::Result<Vec<String>> {
    let since = now_ms().saturating_sub(FORGET_NODE_AFTER.as_millis() as u64);
    redis::cmd("ZRANGEBYSCORE")
        .arg(&keys.nodes)
        .arg(since)
        .arg("+inf")
        .query_async(conn)
        .await
        .map_err(redis_error)
}

/// Writes this node's turns to its sets as they happen, and refreshes them every
/// [`HEARTBEAT`]. After a failure, or when its keys are gone (they expired while this
/// node could not reach Redis, or Redis lost its data), it writes them whole again.
async fn publish(
    mut conn: RedisConnection,
    keys: Keys,
    node: String,
    hub: Arc<Hub>,
    stop: CancellationToken,
) {
    let (uids_key, tracks_key) = (keys.node_uids(&node), keys.node_tracks(&node));
    let ttl_ms = NODE_TTL.as_millis() as u64;
    let mut rewrite = true;
    let mut next_heartbeat = Instant::now();
    loop {
        let (turned_uids, turned_tracks) = hub.take_turns();
        let heartbeat_due = Instant::now() >= next_heartbeat;
        if !rewrite && !heartbeat_due && turned_uids.is_empty() && turned_tracks.is_empty() {
            // Woken for a turn already written: no round trip.
            tokio::select! {
                () = stop.cancelled() => break,
                () = hub.turned() => {}
                () = tokio::time::sleep_until(next_heartbeat.into()) => {}
            }
            continue;
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        if rewrite {
            let (uids, tracks) = hub.open();
            pipe.cmd("DEL").arg(&uids_key).arg(&tracks_key).ignore();
            if !uids.is_empty() {
                pipe.cmd("SADD").arg(&uids_key).arg(names(&uids)).ignore();
            }
            if !tracks.is_empty() {
                pipe.cmd("SADD")
                    .arg(&tracks_key)
                    .arg(names(&tracks))
                    .ignore();
            }
        } else {
            let (on, off): (Vec<_>, Vec<_>) =
                turned_uids.iter().partition(|uid| hub.online(uid) > 0);
            add_remove(&mut pipe, &uids_key, &on, &off);
            let (on, off): (Vec<_>, Vec<_>) = turned_tracks
                .iter()
                .partition(|track| hub.track_open(track));
            add_remove(&mut pipe, &tracks_key, &on, &off);
        }
        if rewrite || !turned_uids.is_empty() || !turned_tracks.is_empty() {
            // Tells the reporter there is something to diff.
            pipe.cmd("INCR").arg(&keys.epoch).ignore();
        }
        // EXISTS before the refresh: a key missing here lost what was written before.
        pipe.cmd("EXISTS").arg(&uids_key);
        pipe.cmd("PEXPIRE").arg(&uids_key).arg(ttl_ms).ignore();
        pipe.cmd("PEXPIRE").arg(&tracks_key).arg(ttl_ms).ignore();
        pipe.cmd("ZADD")
            .arg(&keys.nodes)
            .arg(now_ms())
            .arg(&node)
            .ignore();
        let result: redis::RedisResult<(u8,)> = pipe.query_async(&mut conn).await;
        match result {
            Ok((exists,)) => {
                // An empty set is no key; one that should hold uids must exist.
                rewrite = exists == 0 && hub.online_count() > 0;
            }
            Err(e) => {
                tracing::warn!("cannot write this node's presence to redis: {e}");
                rewrite = true;
            }
        }
        if heartbeat_due {
            next_heartbeat = Instant::now() + HEARTBEAT;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = hub.turned() => {}
            () = tokio::time::sleep_until(next_heartbeat.into()) => {}
        }
    }
}

fn names(list: &[Arc<str>]) -> Vec<&str> {
    list.iter().map(|s| &**s).collect()
}

fn add_remove(pipe: &mut redis::Pipeline, key: &str, add: &[&Arc<str>], remove: &[&Arc<str>]) {
    if !add.is_empty() {
        let add: Vec<&str> = add.iter().map(|s| &***s).collect();
        pipe.cmd("SADD").arg(key).arg(add).ignore();
    }
    if !remove.is_empty() {
        let remove: Vec<&str> = remove.iter().map(|s| &***s).collect();
        pipe.cmd("SREM").arg(key).arg(remove).ignore();
    }
}

/// What the cluster's sets say changed since the last report.
#[derive(Debug, Default)]
struct Diff {
    came_uids: Vec<String>,
    gone_uids: Vec<String>,
    came_tracks: Vec<String>,
    gone_tracks: Vec<String>,
}

/// While this node holds the lease, diffs the cluster every [`REPORT_EVERY`] and
/// reports what changed; what left is reported after its grace.
async fn report(
    mut conn: RedisConnection,
    keys: Keys,
    node: String,
    sink: Arc<dyn PresenceSink>,
    grace: Duration,
    stop: CancellationToken,
) {
    let lease = Script::new(LEASE_SCRIPT);
    let diff = Script::new(DIFF_SCRIPT);
    // What left and when its grace runs out; known only to the reporter (a new one
    // starts the grace again: an offline comes late, never early).
    let mut leaving_uids: HashMap<String, Instant> = HashMap::new();
    let mut leaving_tracks: HashMap<String, Instant> = HashMap::new();
    let mut lease_until = Instant::now();
    // What the last diff saw (the epoch, the node sets alive, which nodes); `None`:
    // diff whatever the cluster says (a new reporter, a failure, graces running).
    let mut last_seen: Option<Seen> = None;
    loop {
        let now = Instant::now();
        if now >= lease_until {
            let held: redis::RedisResult<i64> = lease
                .key(&keys.leader)
                .arg(&node)
                .arg(LEASE.as_millis() as u64)
                .invoke_async(&mut conn)
                .await;
            if matches!(held, Ok(1)) {
                // Renewed well before it runs out.
                lease_until = now + HEARTBEAT;
            } else {
                leaving_uids.clear();
                leaving_tracks.clear();
                last_seen = None;
                lease_until = now + HEARTBEAT;
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(HEARTBEAT) => continue,
                }
            }
        }
        if !leaving_uids.is_empty() || !leaving_tracks.is_empty() {
            // Graces are running: each tick looks whether they ran out or came back.
            last_seen = None;
        }
        match diff_cluster(&mut conn, &keys, &diff, last_seen.as_ref()).await {
            Ok((seen, None)) => last_seen = Some(seen),
            Ok((seen, Some(d))) => {
                last_seen = Some(seen);
                let events = transitions(d, &mut leaving_uids, &mut leaving_tracks, grace);
                if !events.is_empty() {
                    emit(&*sink, events.clone());
                    if let Err(e) = record(&mut conn, &keys, &events).await {
                        // Reported again by the next diff: at least once.
                        tracing::warn!("cannot record reported presence in redis: {e}");
                        last_seen = None;
                    }
                }
            }
            Err(e) => {
                tracing::warn!("cannot read the cluster's presence from redis: {e}");
                last_seen = None;
            }
        }
        let next = [leaving_uids.values().min(), leaving_tracks.values().min()]
            .into_iter()
            .flatten()
            .min()
            .copied();
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(REPORT_EVERY) => {}
            () = until(next) => {}
        }
    }
}

/// What a diff saw of the cluster: if all of it is the same at the next tick, nothing
/// changed and the diff is skipped.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    epoch: String,
    alive: u64,
    nodes: Vec<String>,
}

/// Diffs the cluster against what was reported, unless nothing changed since `last`:
/// what it saw, and the diff when it made one.
async fn diff_cluster(
    conn: &mut RedisConnection,
    keys: &Keys,
    script: &Script,
    last: Option<&Seen>,
) -> engine::Result<(Seen, Option<Diff>)> {
    let forget_before = now_ms().saturating_sub(FORGET_NODE_AFTER.as_millis() as u64);
    redis::cmd("ZREMRANGEBYSCORE")
        .arg(&keys.nodes)
        .arg("-inf")
        .arg(format!("({forget_before}"))
        .query_async::<i64>(conn)
        .await
        .map_err(redis_error)?;
    let nodes = live_nodes(conn, keys).await?;
    let same_nodes = last.filter(|last| last.nodes == nodes);
    let mut call = script.prepare_invoke();
    call.key(&keys.reported_uids)
        .key(&keys.reported_tracks)
        .key(&keys.scratch_uids)
        .key(&keys.scratch_tracks)
        .key(&keys.epoch)
        .arg(nodes.len())
        .arg(same_nodes.map_or("", |last| last.epoch.as_str()))
        .arg(same_nodes.map_or(0, |last| last.alive))
        .arg(if same_nodes.is_some() { "0" } else { "1" });
    for node in &nodes {
        call.key(keys.node_uids(node));
    }
    for node in &nodes {
        call.key(keys.node_tracks(node));
    }
    type Answer = (
        u8,
        String,
        u64,
        Vec<String>,
        Vec<String>,
        Vec<String>,
        Vec<String>,
    );
    let (diffed, epoch, alive, came_uids, gone_uids, came_tracks, gone_tracks): Answer =
        call.invoke_async(conn).await.map_err(redis_error)?;
    let seen = Seen {
        epoch,
        alive,
        nodes,
    };
    let diff = (diffed == 1).then_some(Diff {
        came_uids,
        gone_uids,
        came_tracks,
        gone_tracks,
    });
    Ok((seen, diff))
}

/// The events a diff makes, given what is already leaving; updates that.
fn transitions(
    diff: Diff,
    leaving_uids: &mut HashMap<String, Instant>,
    leaving_tracks: &mut HashMap<String, Instant>,
    grace: Duration,
) -> Vec<PresenceEvent> {
    let now = Instant::now();
    let mut events: Vec<PresenceEvent> = Vec::new();
    events.extend(
        diff.came_uids
            .into_iter()
            .map(|uid| PresenceEvent::ListenerOnline { uid }),
    );
    events.extend(
        diff.came_tracks
            .into_iter()
            .map(|track| PresenceEvent::TrackOccupied { track }),
    );
    let vacated = due(leaving_tracks, diff.gone_tracks, now, grace);
    events.extend(
        vacated
            .into_iter()
            .map(|track| PresenceEvent::TrackVacated { track }),
    );
    let offline = due(leaving_uids, diff.gone_uids, now, grace);
    events.extend(
        offline
            .into_iter()
            .map(|uid| PresenceEvent::ListenerOffline { uid }),
    );
    events
}

/// Of what is `gone` now: those whose grace ran out (removed from `leaving`); the
/// others start or keep their grace; whatever is no longer gone came back.
fn due(
    leaving: &mut HashMap<String, Instant>,
    gone: Vec<String>,
    now: Instant,
    grace: Duration,
) -> Vec<String> {
    let gone: HashSet<String> = gone.into_iter().collect();
    leaving.retain(|key, _| gone.contains(key));
    let mut due = Vec::new();
    for key in gone {
        let at = *leaving.entry(key.clone()).or_insert(now + grace);
        if at <= now {
            due.push((at, key));
        }
    }
    due.sort();
    due.into_iter()
        .map(|(_, key)| {
            leaving.remove(&key);
            key
        })
        .collect()
}

/// Writes what was reported, so the next diff (by this node or the next reporter)
/// starts from it.
async fn record(
    conn: &mut RedisConnection,
    keys: &Keys,
    events: &[PresenceEvent],
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    for event in events {
        match event {
            PresenceEvent::ListenerOnline { uid } => {
                pipe.cmd("SADD").arg(&keys.reported_uids).arg(uid)
            }
            PresenceEvent::ListenerOffline { uid } => {
                pipe.cmd("SREM").arg(&keys.reported_uids).arg(uid)
            }
            PresenceEvent::TrackOccupied { track } => {
                pipe.cmd("SADD").arg(&keys.reported_tracks).arg(track)
            }
            PresenceEvent::TrackVacated { track } => {
                pipe.cmd("SREM").arg(&keys.reported_tracks).arg(track)
            }
        };
        pipe.ignore();
    }
    pipe.query_async(conn).await
}
