//! The Redis engine (`--redis URL`): several nodes share one Redis, so any node can
//! serve any listener.
//!
//! What Redis holds (every key starts with the prefix, `dolores:` by default):
//!
//! - `log` — a Stream, the one ordered log. A message at position N has the entry id
//!   `N-0`; subscription changes are entries `N-1`, `N-2`… after message N, so one
//!   stream orders messages *and* the connects and disconnects between them. `seq`
//!   counts positions. Retention trims by count (`MAXLEN` on every append) and by age
//!   (`XTRIM MINID`, from each entry's `ts`).
//! - `epoch` — where the log's current epoch began (absent: 0). A log that may have lost
//!   its tail (a failover to a replica that was behind, a restart without data) starts a
//!   new epoch past every position handed out, and a cursor from before it gets a reset
//!   (see [`EPOCH`] and `docs/several-nodes.md`).
//! - `l:{uid}` — a hash per listener: `cursor`, `seen`, and `s:{track}` = the position
//!   its subscription began. `seen` (a sorted set of uids by last seen) drives expiry;
//!   `subs` (track → subscriber count) the track count.
//! - `t:{track}` — the track's index: a sorted set of the positions of its messages,
//!   trimmed with the log (by every append to the track, and whole by the clean-up once
//!   `tidx`, track → its last position, says everything in it is gone). A listener's
//!   replay and a track's history read these, never the whole log.
//! - `ts:{track}` — the track's subscribers, a sorted set of uids (all scored 0, so in
//!   uid order) for paging through them.
//! - `index` — set once the indexes above were built for a log from before them.
//! - `i:{key}` — an append made with an `Idempotency-Key`: `digest first count`, with a
//!   time to live of [`Limits::idempotency_keep`]. The append script checks and writes
//!   it with the messages, so a repeat stores nothing, whichever node it reaches.
//! - `r:{uid}` — when the listener's tokens were revoked (ms), set by the same script
//!   that forgets it, with a Redis TTL of `Limits::revocation_ttl`, so revocations are
//!   bounded without a sweep.
//!
//! Every write is one Lua script, so it is atomic and costs one round trip whatever the
//! number of listeners or nodes; with `--redis-min-replicas N`, an append is followed by
//! `WAIT N` on a connection of its own. Each node tails `log` with one blocking reader on its
//! own connection and hands every entry to its hub, in stream order: every node sees
//! every message, and every subscription change before the messages that follow it.
//! The maintenance tick checks the epoch and that the tail reader keeps up with the log
//! (a wedged reader turns `/healthz` red). Connections (one server, or Sentinel) are
//! `redis_connection`'s.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::{AsyncConnectionConfig, Script};
use tokio_util::sync::CancellationToken;

use super::acks::PendingAcks;
use super::redis_connection::{COMMAND_TIMEOUT, RedisConnection};
use super::{
    Appended, Change, Engine, EngineError, History, IdempotencyKey, Limits, Listener, Message,
    Position, Replay, Result, StoreCounts, Subscribers, Subscription, TICK, Tail, Update, now_ms,
};

/// How long an append waits for `--redis-min-replicas` replicas to acknowledge it
/// (`WAIT`): replicas on a healthy network answer in a millisecond, and half the
/// [`COMMAND_TIMEOUT`] leaves the connection's own timeout room to see the answer.
const REPLICA_WAIT_MS: u64 = 1000;
/// A tail reader that has read nothing this long while the log moved on is wedged, and
/// `/healthz` says so: longer than a blocked read plus its timeout (3 s), so a reader
/// that is merely reconnecting is not called wedged.
const WEDGED_AFTER: Duration = Duration::from_secs(5);
/// How long the tail reader blocks in one `XREAD`.
const TAIL_BLOCK_MS: u64 = 1000;
/// Most entries the tail reader takes per read.
const TAIL_BATCH: usize = 1000;
/// Entries read per `XRANGE` while replaying a listener's queue.
const REPLAY_SCAN: usize = 1000;
/// Most listeners expired in one tick.
const MAX_EXPIRED_PER_TICK: usize = 1000;
/// Most emptied track indexes deleted in one tick.
const MAX_INDEXES_DROPPED_PER_TICK: usize = 1000;

/// The first position the log still keeps, from its first entry id: an entry `N-k`
/// with k > 0 follows message N, which is then gone. Shared by the scripts below.
/// Positions before the log's epoch (`epoch_key`, see [`EPOCH`]) count as gone too.
///
/// Positions are Lua numbers (doubles): exact below 2^53, which the clock-based epochs
/// stay under until the year 2255; written into strings with `%d`, never `..` (which
/// would print a 16-digit number as `1.7e+15`).
const KEEP_FROM: &str = r"
local function keep_from(log, head, epoch_key)
  local start = tonumber(redis.call('GET', epoch_key) or '0')
  local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
  if #first == 0 then return math.max(tonumber(head), start) + 1, '' end
  local ms, sq = string.match(first[1][1], '^(%d+)-(%d+)$')
  local keep = tonumber(ms)
  if tonumber(sq) > 0 then keep = keep + 1 end
  return math.max(keep, start + 1), first[1][1]
end
";

/// The log's epoch: the position its current stretch began after. It changes when the
/// log may have lost its tail — `seq` is behind a position this node has seen (a
/// replica promoted before it had everything; a Redis restarted without its data) —
/// and then starts past every position ever handed out: past what the node saw, what
/// Redis has, and the clock in microseconds (a log hands out far fewer than a million
/// positions a second, so an epoch begun now is past any earlier epoch's positions even
/// when no node remembers them). A new log starts at epoch 0, as logs always did.
/// Answers the epoch's start.
const EPOCH: &str = r"
local function epoch_of(log, seq_key, epoch_key, floor, now)
  local seq = redis.call('GET', seq_key)
  local start = tonumber(redis.call('GET', epoch_key) or '0')
  if seq and tonumber(seq) >= floor then return start end
  if not seq and floor == 0 and start == 0 and redis.call('EXISTS', log) == 0 then
    redis.call('SET', seq_key, '0')
    return 0
  end
  local new = math.max(now, tonumber(seq or '0') + 1, floor + 1, start + 1)
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  if #last > 0 then new = math.max(new, tonumber(string.match(last[1][1], '^(%d+)')) + 1) end
  local s = string.format('%d', new)
  redis.call('SET', epoch_key, s)
  redis.call('SET', seq_key, s)
  return new
end
";

/// KEYS: log, seq, epoch. ARGV: the highest position this node has seen, the time in
/// microseconds. Answers the epoch's start and the head.
const CHECK_EPOCH: &str = r"
local start = epoch_of(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[2]))
return {start, tonumber(redis.call('GET', KEYS[2]) or '0')}
";

/// KEYS: log, seq, tidx, and, when given, the idempotency key. ARGV: max length, time,
/// the digest of the updates and the key's time to live in ms, the key prefix, the
/// highest position this node has seen and the time in µs (for [`EPOCH`]), then
/// (track, json) pairs. Answers `{0, epoch, ids…}` for a new append, `{1, epoch, ids…}`
/// for a repeat (nothing stored), `{2}` for the key used with other updates.
const APPEND: &str = r"
local epoch = epoch_of(KEYS[1], KEYS[2], ARGV[5] .. 'epoch', tonumber(ARGV[6]), tonumber(ARGV[7]))
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    local digest, first, count = string.match(seen, '^(%x+) (%d+) (%d+)$')
    if digest ~= ARGV[3] then return {2} end
    local ids = {1, epoch}
    for n = tonumber(first), tonumber(first) + tonumber(count) - 1 do ids[#ids + 1] = n end
    return ids
  end
end
local ids, tracks = {0, epoch}, {}
for i = 8, #ARGV, 2 do
  local n = redis.call('INCR', KEYS[2])
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], string.format('%d-0', n), 'k', 'm', 't', ARGV[i], 'j', ARGV[i + 1], 'ts', ARGV[2])
  redis.call('ZADD', ARGV[5] .. 't:' .. ARGV[i], n, n)
  redis.call('ZADD', KEYS[3], n, ARGV[i])
  tracks[ARGV[i]] = true
  ids[#ids + 1] = n
end
local keep = keep_from(KEYS[1], redis.call('GET', KEYS[2]) or '0', ARGV[5] .. 'epoch')
for t in pairs(tracks) do
  redis.call('ZREMRANGEBYSCORE', ARGV[5] .. 't:' .. t, '-inf', string.format('(%d', keep))
end
if KEYS[4] and #ids > 2 then
  redis.call('SET', KEYS[4], string.format('%s %d %d', ARGV[3], ids[3], #ids - 2), 'PX', ARGV[4])
end
return ids
";

/// A page of the messages of some tracks, in log order, read through their indexes.
/// KEYS: log, seq. ARGV: key prefix, limit, head ('' for now), then (track, after)
/// pairs. Returns the head, the log's first entry id ('' when empty), the entries and
/// the epoch's start.
const HISTORY: &str = r"
local head = ARGV[3]
if head == '' then head = redis.call('GET', KEYS[2]) or '0' end
local keep, fid = keep_from(KEYS[1], head, ARGV[1] .. 'epoch')
local limit = tonumber(ARGV[2])
local positions = {}
for i = 4, #ARGV, 2 do
  local from = math.max(tonumber(ARGV[i + 1]) + 1, keep)
  local found = redis.call('ZRANGEBYSCORE', ARGV[1] .. 't:' .. ARGV[i], from, head, 'LIMIT', 0, limit)
  for _, p in ipairs(found) do positions[#positions + 1] = tonumber(p) end
end
table.sort(positions)
local entries = {}
for i = 1, math.min(limit, #positions) do
  local id = string.format('%d-0', positions[i])
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e > 0 then entries[#entries + 1] = e[1] end
end
return {head, fid, entries, redis.call('GET', ARGV[1] .. 'epoch') or '0'}
";

/// Deletes the indexes of tracks whose every message is gone. KEYS: tidx, log, seq.
/// ARGV: key prefix, then tracks.
const DROP_INDEXES: &str = r"
local keep = keep_from(KEYS[2], redis.call('GET', KEYS[3]) or '0', ARGV[1] .. 'epoch')
for i = 2, #ARGV do
  local last = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if last and tonumber(last) < keep then
    redis.call('DEL', ARGV[1] .. 't:' .. ARGV[i])
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return 0
";

/// ARGV: time, uid, key prefix, the highest position this node has seen, the time in
/// µs (for [`EPOCH`]), then tracks.
const CONNECT: &str = r"
epoch_of(KEYS[5], KEYS[2], ARGV[3] .. 'epoch', tonumber(ARGV[4]), tonumber(ARGV[5]))
local head = redis.call('GET', KEYS[2]) or '0'
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('HSET', KEYS[1], 'cursor', head) end
for i = 6, #ARGV do
  if redis.call('HSETNX', KEYS[1], 's:' .. ARGV[i], head) == 1 then
    redis.call('HINCRBY', KEYS[3], ARGV[i], 1)
    redis.call('ZADD', ARGV[3] .. 'ts:' .. ARGV[i], 0, ARGV[2])
    redis.call('XADD', KEYS[5], head .. '-*', 'k', 'c', 'u', ARGV[2], 't', ARGV[i], 'ts', ARGV[1])
  end
end
redis.call('HSET', KEYS[1], 'seen', ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[2])
return redis.call('HGETALL', KEYS[1])
";

/// ARGV[3] is the track, or '' to forget the listener; ARGV[4], when not '', forgets
/// only a listener still unseen since then (expiry racing a reconnect); ARGV[5], when
/// not '', revokes the listener's tokens (KEYS[6]) for that many ms, even when the
/// listener is already gone; ARGV[6] is the key prefix; ARGV[7] and ARGV[8] the
/// highest position this node has seen and the time in µs (for [`EPOCH`]).
const DISCONNECT: &str = r"
if ARGV[3] == '' and ARGV[5] ~= '' then redis.call('SET', KEYS[6], ARGV[1], 'PX', ARGV[5]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
epoch_of(KEYS[5], KEYS[2], ARGV[6] .. 'epoch', tonumber(ARGV[7]), tonumber(ARGV[8]))
local head = redis.call('GET', KEYS[2]) or '0'
if ARGV[3] ~= '' then
  if redis.call('HDEL', KEYS[1], 's:' .. ARGV[3]) == 1 then
    if redis.call('HINCRBY', KEYS[3], ARGV[3], -1) <= 0 then redis.call('HDEL', KEYS[3], ARGV[3]) end
    redis.call('ZREM', ARGV[6] .. 'ts:' .. ARGV[3], ARGV[2])
    redis.call('XADD', KEYS[5], head .. '-*', 'k', 'd', 'u', ARGV[2], 't', ARGV[3], 'ts', ARGV[1])
  end
  redis.call('HSET', KEYS[1], 'seen', ARGV[1])
  redis.call('ZADD', KEYS[4], ARGV[1], ARGV[2])
  return redis.call('HGETALL', KEYS[1])
end
if ARGV[4] ~= '' and tonumber(redis.call('HGET', KEYS[1], 'seen') or '0') >= tonumber(ARGV[4]) then
  return redis.call('HGETALL', KEYS[1])
end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 2) == 's:' then
    local t = string.sub(f, 3)
    if redis.call('HINCRBY', KEYS[3], t, -1) <= 0 then redis.call('HDEL', KEYS[3], t) end
    redis.call('ZREM', ARGV[6] .. 'ts:' .. t, ARGV[2])
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('XADD', KEYS[5], head .. '-*', 'k', 'f', 'u', ARGV[2], 'ts', ARGV[1])
return {}
";

const ACK: &str = r"
local c = redis.call('HGET', KEYS[1], 'cursor')
if not c then return 0 end
if tonumber(ARGV[1]) > tonumber(c) then redis.call('HSET', KEYS[1], 'cursor', ARGV[1]) end
if tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[1], 'seen') or '0') then
  redis.call('HSET', KEYS[1], 'seen', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
end
return 1
";

/// The listener, the head, the first entry id and the epoch's start, read atomically.
/// KEYS: listener, seq, log, epoch.
const SNAPSHOT: &str = r"
local l = redis.call('HGETALL', KEYS[1])
if #l == 0 then return false end
local head = redis.call('GET', KEYS[2]) or '0'
local first = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
local fid = ''
if #first > 0 then fid = first[1][1] end
return {head, fid, l, redis.call('GET', KEYS[4]) or '0'}
";

fn redis_error(e: redis::RedisError) -> EngineError {
    EngineError::Storage(format!("redis: {e}"))
}

struct Keys {
    log: String,
    seq: String,
    subs: String,
    seen: String,
    tidx: String,
    index: String,
    epoch: String,
    prefix: String,
}

impl Keys {
    fn subscribers(&self, track: &str) -> String {
        format!("{}ts:{track}", self.prefix)
    }

    fn track_index(&self, track: &str) -> String {
        format!("{}t:{track}", self.prefix)
    }

    fn listener(&self, uid: &str) -> String {
        format!("{}l:{uid}", self.prefix)
    }

    fn idempotency(&self, key: &str) -> String {
        format!("{}i:{key}", self.prefix)
    }

    fn revocation(&self, uid: &str) -> String {
        format!("{}r:{uid}", self.prefix)
    }
}

struct Scripts {
    append: Script,
    connect: Script,
    disconnect: Script,
    ack: Script,
    snapshot: Script,
    history: Script,
    drop_indexes: Script,
    check_epoch: Script,
}

/// What the engine's background tasks share with it.
struct Shared {
    conn: RedisConnection,
    /// With `--redis-min-replicas`, appends and their `WAIT` go through a connection of
    /// their own: `WAIT` blocks the connection it runs on, which would stall every other
    /// command on the shared one.
    append_conn: Option<RedisConnection>,
    /// `--redis-min-replicas`: replicas that must acknowledge an append before it is.
    min_replicas: u32,
    keys: Keys,
    scripts: Scripts,
    limits: Limits,
    acks: PendingAcks,
    healthy: AtomicBool,
    /// This node's hub: told `Lost` when the log's epoch changes.
    tail: Arc<dyn Tail>,
    /// The highest position this node has seen handed out (appended, read by the tail
    /// reader, or read as the head): a log whose `seq` is behind it lost its tail.
    floor: AtomicU64,
    /// The epoch this node knows (see [`EPOCH`]).
    epoch: AtomicU64,
    /// The position of the last entry the tail reader read.
    tail_pos: AtomicU64,
    /// Why the tail reader counts as wedged, while it does (see [`WEDGED_AFTER`]).
    wedged: Mutex<Option<String>>,
}

/// The Redis engine. See the module docs.
pub(crate) struct RedisEngine {
    shared: Arc<Shared>,
    closed: AtomicBool,
    stop: CancellationToken,
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine")
            .field("prefix", &self.shared.keys.prefix)
            .finish()
    }
}

/// An entry of the log.
struct Entry {
    pos: Position,
    seq: u64,
    fields: HashMap<String, String>,
}

type RawEntry = (String, Vec<String>);
/// An `XREAD` answer: per stream, its entries (none when the block timed out).
type XreadReply = Option<Vec<(String, Vec<RawEntry>)>>;

fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

fn parse_entry((id, flat): RawEntry) -> Entry {
    let (pos, seq) = parse_id(&id);
    let mut fields = HashMap::new();
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        fields.insert(k, v);
    }
    Entry { pos, seq, fields }
}

/// Every position up to this one is gone, given the log's head, first entry id and
/// epoch: a position from before the epoch belongs to a log that may have lost entries
/// after it, so it counts as gone.
fn trimmed_through(head: Position, first_id: &str, epoch: Position) -> Position {
    let trimmed = if first_id.is_empty() {
        head
    } else {
        match parse_id(first_id) {
            (pos, 0) => pos.saturating_sub(1),
            (pos, _) => pos,
        }
    };
    trimmed.max(epoch)
}

fn field(entry: &Entry, name: &str) -> String {
    entry.fields.get(name).cloned().unwrap_or_default()
}

/// The message a `k=m` entry holds.
fn message(entry: &Entry) -> Arc<Message> {
    Arc::new(Message::new(
        entry.pos,
        field(entry, "t").into(),
        field(entry, "j").into(),
        field(entry, "ts").parse().unwrap_or(0),
    ))
}

/// A listener from its hash (flat field/value list).
fn parse_listener(uid: &str, flat: Vec<String>) -> Listener {
    let mut listener = Listener {
        uid: uid.to_owned(),
        tracks: Vec::new(),
        cursor: 0,
        last_seen_ms: 0,
    };
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        match k.as_str() {
            "cursor" => listener.cursor = v.parse().unwrap_or(0),
            "seen" => listener.last_seen_ms = v.parse().unwrap_or(0),
            _ => {
                if let Some(track) = k.strip_prefix("s:") {
                    listener.tracks.push(Subscription {
                        track: track.to_owned(),
                        since: v.parse().unwrap_or(0),
                    });
                }
            }
        }
    }
    // A hash has no order; subscriptions read back oldest first.
    listener
        .tracks
        .sort_by(|a, b| (a.since, &a.track).cmp(&(b.since, &b.track)));
    listener
}

/// A connection to Redis at `url` (`redis://` or `redis+sentinel://`) as every part of a
/// node uses one (the engine, presence, the webhook outbox): see `redis_connection`.
pub(crate) async fn connect(url: &str) -> Result<RedisConnection> {
    RedisConnection::open(url).await
}

/// Microseconds since the Unix epoch, now: where a new epoch starts at the earliest.
fn now_us() -> u64 {
    now_ms().saturating_mul(1000)
}

/// `prefix` as the start of a key: ending in one `:`, or empty.
pub(crate) fn key_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with(':') {
        prefix.to_owned()
    } else {
        format!("{prefix}:")
    }
}

impl RedisEngine {
    /// Connects to Redis at `url` and starts the tail reader and the maintenance tick.
    /// With `min_replicas` > 0, an append is acknowledged only once that many replicas
    /// have it.
    pub(crate) async fn open(
        url: &str,
        prefix: &str,
        min_replicas: u32,
        limits: Limits,
        tail: Arc<dyn Tail>,
    ) -> Result<Self> {
        let conn = RedisConnection::open(url).await?;
        let append_conn = if min_replicas > 0 {
            Some(RedisConnection::open(url).await?)
        } else {
            None
        };
        let prefix = key_prefix(prefix);
        let keys = Keys {
            log: format!("{prefix}log"),
            seq: format!("{prefix}seq"),
            subs: format!("{prefix}subs"),
            seen: format!("{prefix}seen"),
            tidx: format!("{prefix}tidx"),
            index: format!("{prefix}index"),
            epoch: format!("{prefix}epoch"),
            prefix,
        };
        let shared = Arc::new(Shared {
            conn,
            append_conn,
            min_replicas,
            keys,
            scripts: Scripts {
                append: Script::new(&format!("{KEEP_FROM}{EPOCH}{APPEND}")),
                connect: Script::new(&format!("{EPOCH}{CONNECT}")),
                disconnect: Script::new(&format!("{EPOCH}{DISCONNECT}")),
                ack: Script::new(ACK),
                snapshot: Script::new(SNAPSHOT),
                history: Script::new(&format!("{KEEP_FROM}{HISTORY}")),
                drop_indexes: Script::new(&format!("{KEEP_FROM}{DROP_INDEXES}")),
                check_epoch: Script::new(&format!("{EPOCH}{CHECK_EPOCH}")),
            },
            limits,
            acks: PendingAcks::default(),
            healthy: AtomicBool::new(true),
            tail,
            floor: AtomicU64::new(0),
            epoch: AtomicU64::new(UNKNOWN_EPOCH),
            tail_pos: AtomicU64::new(0),
            wedged: Mutex::new(None),
        });
        shared.build_indexes().await?;
        shared.check_epoch().await?;
        let stop = CancellationToken::new();
        let last_id = shared.last_id().await?;
        shared
            .tail_pos
            .store(parse_id(&last_id).0, Ordering::Relaxed);
        tokio::spawn(tail_reader(shared.clone(), last_id, stop.clone()));
        tokio::spawn(maintenance(shared.clone(), stop.clone()));
        Ok(Self {
            shared,
            closed: AtomicBool::new(false),
            stop,
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            Err(EngineError::Closed)
        } else {
            Ok(())
        }
    }
}

/// What [`Shared::epoch`] holds before the first answer.
const UNKNOWN_EPOCH: u64 = u64::MAX;

impl Shared {
    fn conn(&self) -> RedisConnection {
        self.conn.clone()
    }

    /// Raises the floor to `pos`, a position Redis answered.
    fn saw(&self, pos: Position) {
        self.floor.fetch_max(pos, Ordering::Relaxed);
    }

    /// Records the log's epoch as Redis answered it; a change means the log may have
    /// lost entries some streams were given, so every stream catches up from the store
    /// by its cursor (and a cursor from before the epoch gets a `reset`).
    fn note_epoch(&self, start: Position) {
        self.saw(start);
        let known = self.epoch.swap(start, Ordering::Relaxed);
        if known != start && known != UNKNOWN_EPOCH {
            tracing::warn!(
                "the redis log has a new epoch, starting after position {start} (it was {known}): \
                 it may have lost its last entries (a failover to a replica that was behind, \
                 or a restart without data); streams from before it get a reset"
            );
            self.tail.apply(&[Change::Lost], Duration::ZERO);
        }
    }

    /// Runs the epoch check ([`EPOCH`]) with this node's floor; answers the head.
    async fn check_epoch(&self) -> Result<Position> {
        let mut call = self.scripts.check_epoch.prepare_invoke();
        call.key(&self.keys.log)
            .key(&self.keys.seq)
            .key(&self.keys.epoch)
            .arg(self.floor.load(Ordering::Relaxed))
            .arg(now_us());
        let (start, head): (u64, u64) = self.observe(call.invoke_async(&mut self.conn()).await)?;
        self.note_epoch(start);
        self.saw(head);
        Ok(head)
    }

    fn observe<T>(&self, result: redis::RedisResult<T>) -> Result<T> {
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        result.map_err(redis_error)
    }

    async fn last_id(&self) -> Result<String> {
        let last: Vec<RawEntry> = self.observe(
            redis::cmd("XREVRANGE")
                .arg(&self.keys.log)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut self.conn())
                .await,
        )?;
        Ok(last
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id))
    }

    async fn disconnect(
        &self,
        uid: &str,
        track: Option<&str>,
        stale_before: Option<u64>,
    ) -> Result<Option<Vec<String>>> {
        let k = &self.keys;
        let mut call = self.scripts.disconnect.prepare_invoke();
        // Expiry revokes nothing; the app's disconnect of a whole listener does.
        let revoke_for_ms = match (track, stale_before) {
            (None, None) => self.limits.revocation_ttl.as_millis().max(1).to_string(),
            _ => String::new(),
        };
        call.key(k.listener(uid))
            .key(&k.seq)
            .key(&k.subs)
            .key(&k.seen)
            .key(&k.log)
            .key(k.revocation(uid))
            .arg(now_ms())
            .arg(uid)
            .arg(track.unwrap_or(""))
            .arg(stale_before.map(|b| b.to_string()).unwrap_or_default())
            .arg(revoke_for_ms)
            .arg(&k.prefix)
            .arg(self.floor.load(Ordering::Relaxed))
            .arg(now_us());
        let left: Option<Vec<String>> = self.observe(call.invoke_async(&mut self.conn()).await)?;
        Ok(left.map(|flat| parse_listener(uid, flat).track_names()))
    }

    /// Writes the pending acks; they stay pending until written (see `acks`), and
    /// those that fail are written by the next tick.
    async fn flush_acks(&self) {
        let acks = self.acks.snapshot();
        if acks.is_empty() {
            return;
        }
        let calls = acks.iter().map(|(uid, ack)| async move {
            let mut call = self.scripts.ack.prepare_invoke();
            call.key(self.keys.listener(uid))
                .key(&self.keys.seen)
                .arg(ack.cursor)
                .arg(ack.seen_ms)
                .arg(uid);
            call.invoke_async::<i64>(&mut self.conn()).await
        });
        let results = futures_util::future::join_all(calls).await;
        let mut written = Vec::with_capacity(acks.len());
        let mut failed = None;
        let mut failures = 0;
        for (entry, result) in acks.iter().zip(results) {
            match result {
                Ok(_) => written.push(entry),
                Err(e) => {
                    failures += 1;
                    failed.get_or_insert(e);
                }
            }
        }
        self.acks.forget_written(written);
        if let Some(e) = failed {
            tracing::warn!("cannot write {failures} cursor(s) to redis: {e}");
            self.healthy.store(false, Ordering::Relaxed);
        }
    }

    /// Deletes the indexes of tracks none of whose messages the log still holds (a
    /// bounded batch: the tracks whose last message is oldest).
    async fn drop_emptied_indexes(&self) -> Result<()> {
        let oldest: Vec<String> = self.observe(
            redis::cmd("ZRANGE")
                .arg(&self.keys.tidx)
                .arg(0)
                .arg(MAX_INDEXES_DROPPED_PER_TICK - 1)
                .query_async(&mut self.conn())
                .await,
        )?;
        if oldest.is_empty() {
            return Ok(());
        }
        let mut call = self.scripts.drop_indexes.prepare_invoke();
        call.key(&self.keys.tidx)
            .key(&self.keys.log)
            .key(&self.keys.seq)
            .arg(&self.keys.prefix)
            .arg(oldest);
        self.observe(call.invoke_async::<i64>(&mut self.conn()).await)?;
        Ok(())
    }

    /// Builds the track indexes (`t:`, `tidx`, `ts:`) for a log and listeners written
    /// before they existed, once (`index` marks it done). Idempotent, so nodes starting
    /// together may both do it; appends meanwhile index themselves.
    async fn build_indexes(&self) -> Result<()> {
        let k = &self.keys;
        let done: Option<String> = self.observe(
            redis::cmd("GET")
                .arg(&k.index)
                .query_async(&mut self.conn())
                .await,
        )?;
        if done.is_some() {
            return Ok(());
        }
        let mut from = "-".to_owned();
        loop {
            let raw: Vec<RawEntry> = self.observe(
                redis::cmd("XRANGE")
                    .arg(&k.log)
                    .arg(&from)
                    .arg("+")
                    .arg("COUNT")
                    .arg(REPLAY_SCAN)
                    .query_async(&mut self.conn())
                    .await,
            )?;
            let scanned = raw.len();
            let mut pipe = redis::pipe();
            for raw in raw {
                from = format!("({}", raw.0);
                let entry = parse_entry(raw);
                if field(&entry, "k") == "m" {
                    let track = field(&entry, "t");
                    pipe.cmd("ZADD")
                        .arg(k.track_index(&track))
                        .arg(entry.pos)
                        .arg(entry.pos)
                        .ignore();
                    pipe.cmd("ZADD")
                        .arg(&k.tidx)
                        .arg(entry.pos)
                        .arg(track)
                        .ignore();
                }
            }
            if pipe.cmd_iter().next().is_some() {
                self.observe(pipe.query_async::<()>(&mut self.conn()).await)?;
            }
            if scanned < REPLAY_SCAN {
                break;
            }
        }
        let uids: Vec<String> = self.observe(
            redis::cmd("ZRANGE")
                .arg(&k.seen)
                .arg(0)
                .arg(-1)
                .query_async(&mut self.conn())
                .await,
        )?;
        for chunk in uids.chunks(REPLAY_SCAN) {
            let mut pipe = redis::pipe();
            for uid in chunk {
                pipe.cmd("HGETALL").arg(k.listener(uid));
            }
            let listeners: Vec<Vec<String>> =
                self.observe(pipe.query_async(&mut self.conn()).await)?;
            let mut pipe = redis::pipe();
            for (uid, flat) in chunk.iter().zip(listeners) {
                for track in parse_listener(uid, flat).track_names() {
                    pipe.cmd("ZADD")
                        .arg(k.subscribers(&track))
                        .arg(0)
                        .arg(uid)
                        .ignore();
                }
            }
            if pipe.cmd_iter().next().is_some() {
                self.observe(pipe.query_async::<()>(&mut self.conn()).await)?;
            }
        }
        self.observe(
            redis::cmd("SET")
                .arg(&k.index)
                .arg(1)
                .query_async::<()>(&mut self.conn())
                .await,
        )?;
        Ok(())
    }

    /// Up to `limit` messages of `tracks` (each after its own position), in log order,
    /// read through their indexes up to `head` (`None`: the log's head now). Returns the
    /// messages, the head, and the last position retention deleted, read with them.
    async fn history(
        &self,
        tracks: &[(&str, Position)],
        head: Option<Position>,
        limit: usize,
    ) -> Result<(Vec<Arc<Message>>, Position, Position)> {
        let mut call = self.scripts.history.prepare_invoke();
        call.key(&self.keys.log)
            .key(&self.keys.seq)
            .arg(&self.keys.prefix)
            .arg(limit)
            .arg(head.map(|h| h.to_string()).unwrap_or_default());
        for (track, after) in tracks {
            call.arg(*track).arg(*after);
        }
        let (head, first_id, raw, start): (String, String, Vec<RawEntry>, String) =
            self.observe(call.invoke_async(&mut self.conn()).await)?;
        let head: Position = head.parse().unwrap_or(0);
        let start: Position = start.parse().unwrap_or(0);
        let messages = raw
            .into_iter()
            .map(|raw| message(&parse_entry(raw)))
            .collect();
        Ok((messages, head, trimmed_through(head, &first_id, start)))
    }

    /// Deletes entries older than the retention, and forgets listeners unseen for the
    /// listener ttl.
    async fn clean_up(&self) -> Result<()> {
        let cutoff = self.limits.keep_messages_after(now_ms());
        let oldest: Vec<RawEntry> = self.observe(
            redis::cmd("XRANGE")
                .arg(&self.keys.log)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(REPLAY_SCAN)
                .query_async(&mut self.conn())
                .await,
        )?;
        let mut keep_from = None;
        for raw in oldest {
            let entry = parse_entry(raw);
            let ts: u64 = field(&entry, "ts").parse().unwrap_or(0);
            if ts >= cutoff {
                break;
            }
            keep_from = Some(format!("{}-{}", entry.pos, entry.seq + 1));
        }
        if let Some(min_id) = keep_from {
            let _: i64 = self.observe(
                redis::cmd("XTRIM")
                    .arg(&self.keys.log)
                    .arg("MINID")
                    .arg(min_id)
                    .query_async(&mut self.conn())
                    .await,
            )?;
        }
        self.drop_emptied_indexes().await?;
        let seen_before = self.limits.forget_listeners_seen_before(now_ms());
        let stale: Vec<String> = self.observe(
            redis::cmd("ZRANGEBYSCORE")
                .arg(&self.keys.seen)
                .arg("-inf")
                .arg(format!("({seen_before}"))
                .arg("LIMIT")
                .arg(0)
                .arg(MAX_EXPIRED_PER_TICK)
                .query_async(&mut self.conn())
                .await,
        )?;
        for uid in stale {
            self.disconnect(&uid, None, Some(seen_before)).await?;
        }
        Ok(())
    }
}

/// Every tick: write cursors, clean up, check health — Redis answers, the log's epoch
/// still holds, and the tail reader keeps up with the log.
async fn maintenance(shared: Arc<Shared>, stop: CancellationToken) {
    let every = shared.limits.clean_up_every();
    let mut last_clean_up = Instant::now();
    let mut behind: Option<Behind> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(TICK.min(every)) => {}
        }
        shared.flush_acks().await;
        if last_clean_up.elapsed() >= every {
            last_clean_up = Instant::now();
            if let Err(e) = shared.clean_up().await {
                tracing::warn!("redis clean-up failed: {e}");
            }
        }
        // The epoch check doubles as the health probe (it answers or not) and reads
        // the head the tail reader must keep up with.
        let head = match tokio::time::timeout(COMMAND_TIMEOUT, shared.check_epoch()).await {
            Ok(Ok(head)) => head,
            Ok(Err(_)) => continue,
            Err(_) => {
                shared.healthy.store(false, Ordering::Relaxed);
                continue;
            }
        };
        let read = shared.tail_pos.load(Ordering::Relaxed);
        let start = shared.epoch.load(Ordering::Relaxed);
        behind = watch_tail(behind, read, head, start, Instant::now());
        let wedged = behind.as_ref().and_then(|b| {
            (b.since.elapsed() >= WEDGED_AFTER).then(|| {
                format!(
                    "the redis tail reader is wedged: it has read nothing past position {} \
                     for {} s while the log's head moved on to {head}, so this node's \
                     streams get no new messages",
                    b.read,
                    b.since.elapsed().as_secs()
                )
            })
        });
        if let Ok(mut slot) = shared.wedged.lock() {
            match (&*slot, &wedged) {
                (None, Some(why)) => tracing::warn!("{why}"),
                (Some(_), None) => tracing::warn!("the redis tail reader follows the log again"),
                _ => {}
            }
            *slot = wedged;
        }
    }
}

/// Since when the tail reader has been behind the head without reading anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Behind {
    /// The last position it had read then (and still has).
    read: Position,
    since: Instant,
}

/// The tail reader's progress after one more look: `None` when it has read up to the
/// head (or nothing was appended in this epoch yet); else since when it has been stuck
/// where it is. A reader that moves, even while still behind, starts a new wait.
fn watch_tail(
    behind: Option<Behind>,
    read: Position,
    head: Position,
    epoch: Position,
    now: Instant,
) -> Option<Behind> {
    if read >= head || head <= epoch {
        return None;
    }
    match behind {
        Some(b) if b.read == read => Some(b),
        _ => Some(Behind { read, since: now }),
    }
}

/// Tails the log on its own connection and hands every entry to the hub, in order.
async fn tail_reader(shared: Arc<Shared>, mut last_id: String, stop: CancellationToken) {
    let tail = shared.tail.clone();
    let mut last_message = parse_id(&last_id).0;
    let config = AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_millis(TAIL_BLOCK_MS) + COMMAND_TIMEOUT))
        .set_connection_timeout(Some(COMMAND_TIMEOUT));
    'connect: while !stop.is_cancelled() {
        // With Sentinel, the primary now: the reader follows a failover by reconnecting.
        let opened = match shared.conn.target().client().await {
            Ok(client) => client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(redis_error),
            Err(e) => Err(e),
        };
        let mut conn = match opened {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!("redis tail reader cannot connect: {e}");
                shared.healthy.store(false, Ordering::Relaxed);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        // Before reading on: a log that lost what this node saw gets a new epoch (and
        // the hub a `Lost`), so no position this node delivered is handed out again.
        if let Err(e) = shared.check_epoch().await {
            tracing::warn!("redis tail reader: {e}; reconnecting");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue 'connect;
        }
        // A Redis that came back without its data has a shorter log: follow it.
        if let Ok(now_last) = shared.last_id().await
            && parse_id(&now_last) < parse_id(&last_id)
        {
            tracing::warn!(
                "the redis log is behind this node ({now_last} < {last_id}): it lost data"
            );
            last_id = now_last;
            last_message = parse_id(&last_id).0;
            tail.apply(&[Change::Lost], Duration::ZERO);
        }
        loop {
            let mut xread = redis::cmd("XREAD");
            xread
                .arg("COUNT")
                .arg(TAIL_BATCH)
                .arg("BLOCK")
                .arg(TAIL_BLOCK_MS)
                .arg("STREAMS")
                .arg(&shared.keys.log)
                .arg(&last_id);
            let read: redis::RedisResult<XreadReply> = tokio::select! {
                () = stop.cancelled() => break 'connect,
                read = xread.query_async(&mut conn) => read,
            };
            let streams = match read {
                Ok(streams) => streams.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!("redis tail reader: {e}; reconnecting");
                    shared.healthy.store(false, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'connect;
                }
            };
            let started = Instant::now();
            let mut changes = Vec::new();
            for (_, entries) in streams {
                for raw in entries {
                    last_id.clone_from(&raw.0);
                    let entry = parse_entry(raw);
                    shared.saw(entry.pos);
                    if let Some(change) = to_change(&entry, &mut last_message) {
                        changes.extend(change);
                    }
                }
            }
            shared
                .tail_pos
                .store(parse_id(&last_id).0, Ordering::Relaxed);
            if !changes.is_empty() {
                tail.apply(&changes, started.elapsed());
            }
        }
    }
}

/// The change an entry stands for; a gap in message positions (entries trimmed before
/// this node read them) is reported as `Lost` first.
fn to_change(entry: &Entry, last_message: &mut Position) -> Option<Vec<Change>> {
    let uid = || -> Arc<str> { field(entry, "u").into() };
    match field(entry, "k").as_str() {
        "m" => {
            let mut changes = Vec::with_capacity(1);
            if *last_message != 0 && entry.pos > *last_message + 1 {
                changes.push(Change::Lost);
            }
            *last_message = entry.pos;
            changes.push(Change::Appended(message(entry)));
            Some(changes)
        }
        "c" => Some(vec![Change::Connected {
            uid: uid(),
            track: field(entry, "t").into(),
        }]),
        "d" => Some(vec![Change::Disconnected {
            uid: uid(),
            track: Some(field(entry, "t").into()),
        }]),
        "f" => Some(vec![Change::Disconnected {
            uid: uid(),
            track: None,
        }]),
        _ => None,
    }
}

#[async_trait::async_trait]
impl Engine for RedisEngine {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn append_with_key(
        &self,
        updates: Vec<Update>,
        key: Option<IdempotencyKey>,
    ) -> Result<Appended> {
        self.check_open()?;
        let s = &self.shared;
        let mut call = s.scripts.append.prepare_invoke();
        call.key(&s.keys.log)
            .key(&s.keys.seq)
            .key(&s.keys.tidx)
            .arg(s.limits.max_stored_messages)
            .arg(now_ms());
        match &key {
            Some(key) => {
                call.key(s.keys.idempotency(key.key()))
                    .arg(key.digest())
                    .arg(s.limits.idempotency_keep.as_millis().max(1) as u64);
            }
            None => {
                call.arg("").arg(0);
            }
        }
        call.arg(&s.keys.prefix)
            .arg(s.floor.load(Ordering::Relaxed))
            .arg(now_us());
        for update in &updates {
            call.arg(&*update.track).arg(&*update.json);
        }
        let mut conn = s.append_conn.as_ref().unwrap_or(&s.conn).clone();
        let answer: Vec<u64> = s.observe(call.invoke_async(&mut conn).await)?;
        let appended = match answer.as_slice() {
            [status @ (0 | 1), epoch, positions @ ..] => {
                s.note_epoch(*epoch);
                if let Some(last) = positions.last() {
                    s.saw(*last);
                }
                Appended {
                    positions: positions.to_vec(),
                    repeated: *status == 1,
                }
            }
            [2] => return Err(EngineError::KeyReused),
            _ => {
                return Err(EngineError::Storage(format!(
                    "redis: unexpected answer to the append script: {answer:?}"
                )));
            }
        };
        if s.min_replicas > 0 {
            // On the connection that wrote: WAIT counts the replicas that have this
            // client's writes so far (a repeat's too, written by an earlier call).
            let acknowledged: u64 = s.observe(
                redis::cmd("WAIT")
                    .arg(s.min_replicas)
                    .arg(REPLICA_WAIT_MS)
                    .query_async(&mut conn)
                    .await,
            )?;
            if acknowledged < u64::from(s.min_replicas) {
                return Err(EngineError::NotReplicated(format!(
                    "the update reached the redis primary, but only {acknowledged} of the {} \
                     replicas --redis-min-replicas asks for acknowledged it within {REPLICA_WAIT_MS} ms, \
                     so a failover could lose it; retry with the same Idempotency-Key",
                    s.min_replicas
                )));
            }
        }
        Ok(appended)
    }

    async fn connect(&self, uid: &str, tracks: Vec<String>) -> Result<Vec<String>> {
        self.check_open()?;
        let s = &self.shared;
        let mut call = s.scripts.connect.prepare_invoke();
        call.key(s.keys.listener(uid))
            .key(&s.keys.seq)
            .key(&s.keys.subs)
            .key(&s.keys.seen)
            .key(&s.keys.log)
            .arg(now_ms())
            .arg(uid)
            .arg(&s.keys.prefix)
            .arg(s.floor.load(Ordering::Relaxed))
            .arg(now_us());
        for track in &tracks {
            call.arg(track);
        }
        let flat: Vec<String> = s.observe(call.invoke_async(&mut s.conn()).await)?;
        Ok(parse_listener(uid, flat).track_names())
    }

    async fn disconnect(&self, uid: &str, track: Option<String>) -> Result<Option<Vec<String>>> {
        self.check_open()?;
        self.shared.disconnect(uid, track.as_deref(), None).await
    }

    /// One `GET` more when a stream opens with a token; Redis drops the key itself.
    async fn revoked_at(&self, uid: &str) -> Result<Option<u64>> {
        let s = &self.shared;
        let at: Option<u64> = s.observe(
            redis::cmd("GET")
                .arg(s.keys.revocation(uid))
                .query_async(&mut s.conn())
                .await,
        )?;
        Ok(at)
    }

    async fn listener(&self, uid: &str) -> Result<Option<Listener>> {
        let s = &self.shared;
        let read = async {
            let flat: Vec<String> = s.observe(
                redis::cmd("HGETALL")
                    .arg(s.keys.listener(uid))
                    .query_async(&mut s.conn())
                    .await,
            )?;
            Ok((!flat.is_empty()).then(|| parse_listener(uid, flat)))
        };
        s.acks.merged(uid, read).await
    }

    async fn replay(&self, uid: &str, after: Position, limit: usize) -> Result<Option<Replay>> {
        let s = &self.shared;
        let mut call = s.scripts.snapshot.prepare_invoke();
        call.key(s.keys.listener(uid))
            .key(&s.keys.seq)
            .key(&s.keys.log)
            .key(&s.keys.epoch);
        let snapshot: Option<(String, String, Vec<String>, String)> =
            s.observe(call.invoke_async(&mut s.conn()).await)?;
        let Some((head, first_id, flat, start)) = snapshot else {
            return Ok(None);
        };
        let head: Position = head.parse().unwrap_or(0);
        let start: Position = start.parse().unwrap_or(0);
        let listener = parse_listener(uid, flat);
        // Read only up to the snapshot's head: a track connected after it can only have
        // later messages, which the live path brings. What retention deleted is read
        // with the messages, so a page that misses one says so.
        let tracks: Vec<(&str, Position)> = listener
            .tracks
            .iter()
            .map(|t| (t.track.as_str(), after.max(t.since)))
            .collect();
        let trimmed = trimmed_through(head, &first_id, start);
        let (messages, trimmed) = if tracks.is_empty() || after >= head {
            (Vec::new(), trimmed)
        } else {
            let (messages, _, read_trimmed) = s.history(&tracks, Some(head), limit).await?;
            (messages, trimmed.max(read_trimmed))
        };
        Ok(Some(Replay {
            messages,
            tracks: listener.tracks,
            head,
            trimmed_through: trimmed,
            epoch: start,
        }))
    }

    async fn subscribers(&self, track: &str, after: &str, limit: usize) -> Result<Subscribers> {
        let s = &self.shared;
        let key = s.keys.subscribers(track);
        let from = if after.is_empty() {
            "-".to_owned()
        } else {
            format!("({after}")
        };
        let (count, uids): (u64, Vec<String>) = s.observe(
            redis::pipe()
                .cmd("ZCARD")
                .arg(&key)
                .cmd("ZRANGE")
                .arg(&key)
                .arg(from)
                .arg("+")
                .arg("BYLEX")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut s.conn())
                .await,
        )?;
        let seen: Vec<Option<u64>> = if uids.is_empty() {
            Vec::new()
        } else {
            let mut pipe = redis::pipe();
            for uid in &uids {
                pipe.cmd("HGET").arg(s.keys.listener(uid)).arg("seen");
            }
            s.observe(pipe.query_async(&mut s.conn()).await)?
        };
        let page = uids
            .into_iter()
            .zip(seen)
            .map(|(uid, seen)| {
                // Seen by an open stream since the last flush: the pending ack knows.
                let pending = s.acks.get(&uid).map_or(0, |a| a.seen_ms);
                let seen = seen.unwrap_or(0).max(pending);
                (uid, seen)
            })
            .collect();
        Ok(Subscribers { count, page })
    }

    async fn history(&self, track: &str, after: Position, limit: usize) -> Result<History> {
        let (messages, head, trimmed_through) =
            self.shared.history(&[(track, after)], None, limit).await?;
        Ok(History {
            messages,
            head,
            trimmed_through,
        })
    }

    fn ack(&self, uid: &str, pos: Position) {
        self.shared.acks.record(uid, pos);
    }

    async fn counts(&self) -> Result<StoreCounts> {
        let s = &self.shared;
        let (listeners, tracks, messages): (u64, u64, u64) = s.observe(
            redis::pipe()
                .cmd("ZCARD")
                .arg(&s.keys.seen)
                .cmd("HLEN")
                .arg(&s.keys.subs)
                .cmd("XLEN")
                .arg(&s.keys.log)
                .query_async(&mut s.conn())
                .await,
        )?;
        Ok(StoreCounts {
            listeners,
            tracks,
            messages,
        })
    }

    fn healthy(&self) -> bool {
        self.failing().is_none()
    }

    fn failing(&self) -> Option<String> {
        let s = &self.shared;
        if let Some(why) = s.wedged.lock().ok().and_then(|w| w.clone()) {
            return Some(why);
        }
        (!s.healthy.load(Ordering::Relaxed)).then(|| {
            "the redis store is failing (a write or a read did not go through; the log says why)"
                .to_owned()
        })
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.shared.flush_acks().await;
        self.stop.cancel();
    }

    #[cfg(test)]
    fn pending_acks(&self) -> &PendingAcks {
        &self.shared.acks
    }
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::{Behind, RedisEngine, watch_tail};
    use crate::engine::{Change, Engine, Limits, Tail, Update, now_ms};

    #[test]
    fn a_tail_reader_is_behind_only_while_it_reads_nothing_and_the_log_moves() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(watch_tail(None, 10, 10, 0, t0), None, "caught up");
        assert_eq!(
            watch_tail(None, 3, 3_000, 3_000, t0),
            None,
            "nothing in this epoch yet"
        );
        let behind = watch_tail(None, 10, 12, 0, t0);
        assert_eq!(
            behind,
            Some(Behind {
                read: 10,
                since: t0
            })
        );
        assert_eq!(
            watch_tail(behind, 10, 15, 0, t1),
            behind,
            "stuck: the wait goes on"
        );
        assert_eq!(
            watch_tail(behind, 11, 15, 0, t1),
            Some(Behind {
                read: 11,
                since: t1
            }),
            "moving, though behind: a new wait"
        );
        assert_eq!(watch_tail(behind, 15, 15, 0, t1), None);
    }

    #[derive(Default)]
    struct Changes(Mutex<Vec<String>>);

    impl Tail for Changes {
        fn apply(&self, changes: &[Change], _took: Duration) {
            let mut seen = self.0.lock().expect("changes");
            for change in changes {
                seen.push(match change {
                    Change::Appended(m) => m.pos.to_string(),
                    Change::Lost => "lost".into(),
                    _ => "other".into(),
                });
            }
        }
    }

    fn update(text: &str) -> Update {
        Update {
            track: "t".into(),
            json: format!("\"{text}\"").into(),
        }
    }

    /// A primary promoted without the last entries is imitated by taking them off the
    /// log and setting `seq` back, as a replica that was behind would have it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_that_lost_its_tail_starts_a_new_epoch_and_old_cursors_reset() {
        let url = std::env::var("DOLORES_TEST_REDIS")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
        let prefix = format!("dolores-epoch-{}-{}", std::process::id(), now_ms());
        let limits = Limits {
            retention: Duration::from_secs(3600),
            max_stored_messages: 1000,
            listener_ttl: Duration::from_secs(3600),
            idempotency_keep: Duration::from_secs(3600),
            revocation_ttl: Duration::from_secs(3600),
        };
        let tail = Arc::new(Changes::default());
        let engine = RedisEngine::open(&url, &prefix, 0, limits, tail.clone())
            .await
            .expect("redis engine (is redis-server running?)");
        engine
            .connect("listener-1", vec!["t".into()])
            .await
            .expect("connect");
        let old = engine
            .append(vec![update("a"), update("b"), update("c")])
            .await
            .expect("append");
        assert_eq!(old, [1, 2, 3], "a new log starts at epoch 0");

        let client = ::redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let _: () = ::redis::pipe()
            .cmd("XDEL")
            .arg(format!("{prefix}:log"))
            .arg("2-0")
            .arg("3-0")
            .cmd("SET")
            .arg(format!("{prefix}:seq"))
            .arg(1)
            .query_async(&mut conn)
            .await
            .expect("lose the tail");

        let new = engine.append(vec![update("d")]).await.expect("append");
        let start = now_ms() * 1000 - 60_000_000;
        assert!(
            new[0] > start,
            "past the clock, not {} again: {new:?}",
            old[1]
        );
        let epoch = new[0] - 1;
        let seen = tail.0.lock().expect("changes").clone();
        assert!(
            seen.contains(&"lost".to_owned()),
            "the hub hears Lost: {seen:?}"
        );

        let page = engine
            .replay("listener-1", 3, 10)
            .await
            .expect("replay")
            .expect("known");
        assert_eq!(page.epoch, epoch);
        assert!(page.is_reset(3), "a cursor from the old epoch resets");
        assert_eq!(
            page.resume_after_reset(3),
            epoch,
            "then the new epoch follows"
        );
        assert!(page.is_reset(1), "even one the new primary still has");
        let after = engine
            .replay("listener-1", epoch, 10)
            .await
            .expect("replay")
            .expect("known");
        assert!(!after.is_reset(epoch));
        let ids: Vec<u64> = after.messages.iter().map(|m| m.pos).collect();
        assert_eq!(ids, new, "only the new epoch's messages");
        let history = engine.history("t", 0, 10).await.expect("history");
        assert!(history.is_reset(2) && !history.is_reset(epoch));

        engine.close().await;
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut conn)
            .await
            .expect("keys");
        let _: () = ::redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .expect("del");
    }
}
