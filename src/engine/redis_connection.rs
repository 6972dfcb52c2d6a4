//! Connections to the Redis behind `--redis`, for every part of a node that uses it (the
//! engine, presence, the webhook outbox).
//!
//! The URL is either one server (`redis://host:port/db`), or a primary found through
//! Sentinel: `redis+sentinel://[user:password@]host:port,host:port/mastername[/db]`
//! (sentinels without a password; `user:password` and `db` are the primary's). With
//! Sentinel, a [`RedisConnection`] follows a failover: a command that fails makes it ask
//! the sentinels who the primary is now (at most every [`FOLLOW_EVERY`]), and the next
//! commands go there. The command that failed still fails: its caller answers 503 and an
//! `Idempotency-Key` makes the retry safe.
//!
//! This module never decides what a lost write means: that is the epoch's job (`redis`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisFuture, Value};

use super::{EngineError, Result};

/// Longest a command may take before the caller gets a 503: Redis answers in well
/// under a millisecond, so two seconds means it is gone, paused or overloaded.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Sentinels are asked who the primary is at most this often: a failover takes
/// Sentinel a second or more (`down-after-milliseconds`), so asking more often only
/// loads the sentinels while every command fails.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);
/// The port of a sentinel named without one.
const SENTINEL_PORT: u16 = 26379;

/// Where the Redis is: one server, or whichever primary the sentinels name.
#[derive(Debug)]
pub(crate) enum Target {
    /// One server, at this URL.
    Direct(Client, String),
    /// A primary found through Sentinel.
    Sentinel(Sentinel),
}

/// What a `redis+sentinel://` URL says.
#[derive(Debug)]
pub(crate) struct Sentinel {
    /// The sentinels' addresses (`host:port`).
    sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under.
    master: String,
    /// `user:password@` for the primary, as written in the URL, or empty.
    userinfo: String,
    /// The database on the primary.
    db: i64,
}

impl Target {
    /// Reads `url`: `redis://…` or `redis+sentinel://…`.
    pub(crate) fn parse(url: &str) -> Result<Self> {
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            return Sentinel::parse(rest).map(Self::Sentinel);
        }
        if url.starts_with("rediss+sentinel://") {
            return Err(EngineError::Storage(
                "bad redis url: rediss+sentinel:// needs TLS, which this build of dolores does \
                 not have for Redis; use redis+sentinel:// on a private network"
                    .into(),
            ));
        }
        let client =
            Client::open(url).map_err(|e| EngineError::Storage(format!("bad redis url: {e}")))?;
        Ok(Self::Direct(client, url.to_owned()))
    }

    /// A client for the primary now: for Sentinel, the one the sentinels name, checked
    /// to be a primary (a sentinel may not have noticed a failover yet).
    pub(crate) async fn client(&self) -> Result<Client> {
        match self {
            Self::Direct(client, _) => Ok(client.clone()),
            Self::Sentinel(sentinel) => sentinel.primary().await.map(|(_, client)| client),
        }
    }

    /// The URL without its password, for messages.
    fn describe(&self) -> String {
        match self {
            Self::Direct(_, url) => hide_password(url),
            Self::Sentinel(s) => format!(
                "redis+sentinel://{}/{} (db {})",
                s.sentinels.join(","),
                s.master,
                s.db
            ),
        }
    }
}

/// `url` with the password of its `user:password@` replaced by `***`.
fn hide_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl Sentinel {
    /// Reads what follows `redis+sentinel://`.
    fn parse(rest: &str) -> Result<Self> {
        let bad = |why: &str| {
            EngineError::Storage(format!(
                "bad redis url: {why} (expected redis+sentinel://[user:password@]host:port,host:port/mastername[/db])"
            ))
        };
        let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no master name"))?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
            None => (String::new(), authority),
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            let has_port = host
                .rsplit_once(':')
                .is_some_and(|(_, port)| !port.contains(']'));
            if has_port {
                let (_, port) = host.rsplit_once(':').unwrap_or((host, ""));
                port.parse::<u16>()
                    .map_err(|_| bad(&format!("{port:?} is not a port")))?;
                sentinels.push(host.to_owned());
            } else {
                sentinels.push(format!("{host}:{SENTINEL_PORT}"));
            }
        }
        if sentinels.is_empty() {
            return Err(bad("no sentinel address"));
        }
        let mut parts = path.split('/').filter(|p| !p.is_empty());
        let master = parts
            .next()
            .ok_or_else(|| bad("no master name"))?
            .to_owned();
        let db = match parts.next() {
            Some(db) => db
                .parse()
                .map_err(|_| bad(&format!("{db:?} is not a database number")))?,
            None => 0,
        };
        if parts.next().is_some() {
            return Err(bad("too many path segments"));
        }
        Ok(Self {
            sentinels,
            master,
            userinfo,
            db,
        })
    }

    /// Asks the sentinels, in turn, where the primary is; the first answer that names
    /// a server which says it is a primary wins. Returns its `host:port` and a client.
    async fn primary(&self) -> Result<(String, Client)> {
        let mut why = Vec::new();
        for sentinel in &self.sentinels {
            match tokio::time::timeout(COMMAND_TIMEOUT, self.ask(sentinel)).await {
                Ok(Ok(found)) => return Ok(found),
                Ok(Err(e)) => why.push(format!("{sentinel}: {e}")),
                Err(_) => why.push(format!("{sentinel}: no answer")),
            }
        }
        Err(EngineError::Storage(format!(
            "no sentinel named a primary for {:?}: {}",
            self.master,
            why.join("; ")
        )))
    }

    async fn ask(&self, sentinel: &str) -> std::result::Result<(String, Client), String> {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_connection_timeout(Some(COMMAND_TIMEOUT));
        let client = Client::open(format!("redis://{sentinel}")).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let (host, port) = addr.ok_or_else(|| format!("does not know {:?}", self.master))?;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let addr = format!("{host}:{port}");
        let client = Client::open(format!("redis://{}{addr}/{}", self.userinfo, self.db))
            .map_err(|e| e.to_string())?;
        let mut primary = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("names {addr}, which cannot be reached: {e}"))?;
        let role: Vec<Value> = redis::cmd("ROLE")
            .query_async(&mut primary)
            .await
            .map_err(|e| format!("names {addr}, which does not answer ROLE: {e}"))?;
        let is_primary = role
            .first()
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            .is_some_and(|r| r == "master");
        if is_primary {
            Ok((addr, client))
        } else {
            Err(format!("names {addr}, which is not a primary (yet)"))
        }
    }
}

/// A connection to the primary, shared by every task of a node (it is multiplexed; clones
/// are cheap and share it). Commands time out after [`COMMAND_TIMEOUT`]; a lost
/// connection is opened again by itself, and with Sentinel a failover is followed.
#[derive(Clone)]
pub(crate) struct RedisConnection(Arc<Inner>);

struct Inner {
    target: Target,
    /// The primary's `host:port` (for Sentinel; the URL otherwise) and the connection.
    current: Mutex<(String, ConnectionManager)>,
    /// When the sentinels were last asked; locked while they are.
    followed: tokio::sync::Mutex<Option<Instant>>,
    db: i64,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field("target", &self.0.target.describe())
            .finish()
    }
}

/// A managed connection to `client`: timeouts, and one quick retry of a lost
/// connection.
async fn manager(client: &Client, to: &str) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    client
        .get_connection_manager_with_config(config)
        .await
        .map_err(|e| EngineError::Storage(format!("cannot reach redis at {to}: {e}")))
}

impl RedisConnection {
    /// Connects to the Redis `url` names.
    pub(crate) async fn open(url: &str) -> Result<Self> {
        Self::to(Target::parse(url)?).await
    }

    /// Connects to `target`.
    pub(crate) async fn to(target: Target) -> Result<Self> {
        let (addr, client) = match &target {
            Target::Direct(client, url) => (hide_password(url), client.clone()),
            Target::Sentinel(sentinel) => sentinel.primary().await?,
        };
        let conn = manager(&client, &addr).await?;
        let db = match &target {
            Target::Sentinel(s) => s.db,
            Target::Direct(client, _) => client.get_connection_info().redis_settings().db(),
        };
        Ok(Self(Arc::new(Inner {
            target,
            current: Mutex::new((addr, conn)),
            followed: tokio::sync::Mutex::new(None),
            db,
        })))
    }

    /// Where the data is, to open other connections to it (the tail reader's).
    pub(crate) fn target(&self) -> &Target {
        &self.0.target
    }

    fn current(&self) -> ConnectionManager {
        match self.0.current.lock() {
            Ok(current) => current.1.clone(),
            Err(poisoned) => poisoned.into_inner().1.clone(),
        }
    }

    /// After a failed command, with Sentinel: asks where the primary is now, and moves
    /// there if it moved. One caller asks at a time, at most every [`FOLLOW_EVERY`].
    async fn follow(&self) {
        let Target::Sentinel(sentinel) = &self.0.target else {
            return;
        };
        let Ok(mut followed) = self.0.followed.try_lock() else {
            return;
        };
        if followed.is_some_and(|at| at.elapsed() < FOLLOW_EVERY) {
            return;
        }
        *followed = Some(Instant::now());
        let (addr, client) = match sentinel.primary().await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("redis: {e}");
                return;
            }
        };
        let same = match self.0.current.lock() {
            Ok(current) => current.0 == addr,
            Err(poisoned) => poisoned.into_inner().0 == addr,
        };
        if same {
            return;
        }
        match manager(&client, &addr).await {
            Ok(conn) => {
                tracing::warn!("redis: the primary is now {addr} (sentinel failover)");
                match self.0.current.lock() {
                    Ok(mut current) => *current = (addr, conn),
                    Err(poisoned) => *poisoned.into_inner() = (addr, conn),
                }
            }
            Err(e) => tracing::warn!("redis: {e}"),
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let answer = self.current().req_packed_command(cmd).await;
            if answer.is_err() {
                self.follow().await;
            }
            answer
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let answer = self
                .current()
                .req_packed_commands(pipeline, offset, count)
                .await;
            if answer.is_err() {
                self.follow().await;
            }
            answer
        })
    }

    fn get_db(&self) -> i64 {
        self.0.db
    }
}

#[cfg(test)]
mod tests {
    use super::{Target, hide_password};

    #[test]
    fn a_sentinel_url_names_sentinels_master_and_db() {
        let Ok(Target::Sentinel(s)) =
            Target::parse("redis+sentinel://u:p@10.0.0.1:5000,10.0.0.2/mymaster/3")
        else {
            panic!("a sentinel url");
        };
        assert_eq!(s.sentinels, ["10.0.0.1:5000", "10.0.0.2:26379"]);
        assert_eq!(
            (s.master.as_str(), s.db, s.userinfo.as_str()),
            ("mymaster", 3, "u:p@")
        );
        for bad in [
            "redis+sentinel://10.0.0.1:5000",
            "redis+sentinel://10.0.0.1:5000/",
            "redis+sentinel:///m",
            "redis+sentinel://h:port/m",
            "redis+sentinel://h/m/x",
            "rediss+sentinel://h/m",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_hide_the_password() {
        assert_eq!(
            hide_password("redis://me:secret@h:1/0"),
            "redis://me:***@h:1/0"
        );
        assert_eq!(hide_password("redis://h:1/0"), "redis://h:1/0");
    }
}
