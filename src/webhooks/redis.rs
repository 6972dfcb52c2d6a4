//! The outbox of a cluster (`--redis`): one Stream every node writes to, and a lease
//! so that one node at a time sends — each event goes out once per cluster, not once
//! per node (twice at worst, when the sender dies between sending and removing).
//!
//! Keys, under the engine's prefix: `webhooks` (the Stream; the event with sequence
//! number N is entry `N-0`, fields `l` = lane and `b` = body), `webhooks:seq` (the
//! last sequence number handed out) and `webhooks:lease` (the sending node's id, with
//! a TTL of [`LEASE_TTL`]). A node that dies stops renewing its lease; another takes
//! over within [`LEASE_TTL`] and sends everything still in the Stream.

use std::time::Duration;

use crate::engine::RedisConnection;
use redis::Script;

use super::outbox::{Entry, Outbox, OutboxError, Result, Seq, Staged, Stored};

/// How long a lease lasts unless renewed. The sender renews it about once a second
/// (`deliver::LEASE_EVERY`), so a few missed renewals (a GC pause, a slow Redis) do
/// not hand the outbox over; a dead node's events wait at most this long.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(5);

/// ARGV[1] = the bound, then lane, body pairs. Returns how many old events were dropped.
const PUSH: &str = r"
for i = 2, #ARGV, 2 do
  local n = redis.call('INCR', KEYS[2])
  redis.call('XADD', KEYS[1], n .. '-0', 'l', ARGV[i], 'b', ARGV[i + 1])
end
if redis.call('XLEN', KEYS[1]) > tonumber(ARGV[1]) then
  return redis.call('XTRIM', KEYS[1], 'MAXLEN', ARGV[1])
end
return 0
";

/// Takes or renews the lease for ARGV[1] (this node) for ARGV[2] ms; 1 when held.
const LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Deletes the lease if this node (ARGV[1]) holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

fn error(e: redis::RedisError) -> OutboxError {
    OutboxError(format!("redis: {e}"))
}

/// The cluster's outbox in Redis.
pub(crate) struct RedisOutbox {
    conn: RedisConnection,
    stream: String,
    seq: String,
    lease_key: String,
    node: String,
    max: u64,
    push: Script,
    lease: Script,
    release: Script,
}

impl std::fmt::Debug for RedisOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOutbox")
            .field("stream", &self.stream)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl RedisOutbox {
    /// Connects to Redis at `url`; keys under `prefix` (the engine's).
    pub(crate) async fn open(url: &str, prefix: &str, max: u64) -> Result<Self> {
        let conn = crate::engine::connect_redis(url)
            .await
            .map_err(|e| OutboxError(e.to_string()))?;
        let prefix = crate::engine::key_prefix(prefix);
        let node: String = rand::random::<[u8; 12]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            conn,
            stream: format!("{prefix}webhooks"),
            seq: format!("{prefix}webhooks:seq"),
            lease_key: format!("{prefix}webhooks:lease"),
            node,
            max,
            push: Script::new(PUSH),
            lease: Script::new(LEASE),
            release: Script::new(RELEASE),
        })
    }
}

#[async_trait::async_trait]
impl Outbox for RedisOutbox {
    async fn push(&self, entries: Vec<Staged>) -> Result<u64> {
        let mut invocation = self.push.key(&self.stream);
        invocation.key(&self.seq).arg(self.max);
        for Staged { entry, .. } in &entries {
            invocation.arg(&entry.lane).arg(&entry.body);
        }
        invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(error)
    }

    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<Stored>> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.stream)
            .arg(format!("{}-0", after.saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(error)?;
        let mut events = Vec::with_capacity(reply.ids.len());
        for id in reply.ids {
            let seq = id
                .id
                .split('-')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| OutboxError(format!("an entry id that is not ours: {}", id.id)))?;
            let lane: Option<String> = id.get("l");
            let body: Option<String> = id.get("b");
            if let (Some(lane), Some(body)) = (lane, body) {
                events.push(Stored {
                    seq,
                    entry: Entry { lane, body },
                });
            }
        }
        Ok(events)
    }

    async fn remove(&self, seqs: Vec<Seq>) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XDEL");
        cmd.arg(&self.stream);
        for seq in seqs {
            cmd.arg(format!("{seq}-0"));
        }
        cmd.query_async::<u64>(&mut self.conn.clone())
            .await
            .map(drop)
            .map_err(error)
    }

    async fn len(&self) -> Result<u64> {
        redis::cmd("XLEN")
            .arg(&self.stream)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(error)
    }

    async fn contains(&self, seq: Seq) -> Result<bool> {
        let id = format!("{seq}-0");
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.stream)
            .arg(&id)
            .arg(&id)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(error)?;
        Ok(!reply.ids.is_empty())
    }

    async fn lease(&self) -> Result<bool> {
        let held: i64 = self
            .lease
            .key(&self.lease_key)
            .arg(&self.node)
            .arg(LEASE_TTL.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(error)?;
        Ok(held == 1)
    }

    async fn release(&self) {
        let _: std::result::Result<i64, _> = self
            .release
            .key(&self.lease_key)
            .arg(&self.node)
            .invoke_async(&mut self.conn.clone())
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_url() -> String {
        std::env::var("DOLORES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
    }

    fn prefix() -> String {
        format!(
            "dolores-test-webhooks-{}-{}",
            std::process::id(),
            crate::engine::now_ms()
        )
    }

    #[tokio::test]
    async fn the_redis_outbox_passes_the_suite_and_one_node_holds_the_lease() {
        let prefix = prefix();
        let Ok(one) = RedisOutbox::open(&redis_url(), &prefix, 5).await else {
            eprintln!("no Redis at {}: skipped", redis_url());
            return;
        };
        super::super::outbox::tests::suite(&one, 5).await;
        let two = RedisOutbox::open(&redis_url(), &prefix, 5)
            .await
            .expect("open");
        assert!(one.lease().await.expect("lease"));
        assert!(!two.lease().await.expect("lease"));
        assert!(one.lease().await.expect("renewed"));
        one.release().await;
        assert!(two.lease().await.expect("taken over"));
        assert!(!one.lease().await.expect("lease"));
        two.release().await;
        let _: std::result::Result<u64, _> = redis::cmd("DEL")
            .arg(&one.stream)
            .arg(&one.seq)
            .query_async(&mut one.conn.clone())
            .await;
    }
}
