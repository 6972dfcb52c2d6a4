//! Several nodes on one Redis (`--redis`), against real Redis servers: any node serves
//! any listener, one order everywhere, resume across nodes, and no acknowledged
//! message lost when a node or Redis dies.
//!
//! Tests that only need a Redis use the one at `DOLORES_TEST_REDIS` (default
//! 127.0.0.1:6379, started by `scripts/test` if none runs) under a key prefix of their
//! own. Tests that break Redis start a private `redis-server` on a free port, with an
//! append-only file synced on every write, so a restart keeps its data.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{RedisProcess, Server, ServerConfig, Sse, WAIT, uid, within};
use serde_json::json;

fn shared_redis() -> String {
    std::env::var("DOLORES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn prefix(test: &str) -> String {
    format!(
        "dolores-cluster-{test}-{}-{}",
        std::process::id(),
        rand_suffix()
    )
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

async fn node(redis: &str, prefix: &str, extra: &[&str]) -> Server {
    node_config(redis, prefix, extra).start().await
}

/// A node as a process, to be killed.
async fn node_process(redis: &str, prefix: &str, extra: &[&str]) -> Server {
    node_config(redis, prefix, extra).spawn().await
}

fn node_config(redis: &str, prefix: &str, extra: &[&str]) -> ServerConfig {
    Server::config()
        .args(["--redis", redis, "--redis-prefix", prefix])
        .args(extra.iter().copied())
}

/// A redis-server of the test's own, persisting every write (so a kill -9 and a restart
/// on the same dir keep everything acknowledged), killed on drop.
struct OwnRedis {
    dir: tempfile::TempDir,
    process: RedisProcess,
}

impl OwnRedis {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let process = RedisProcess::start_with(&Self::args(&dir)).await;
        Self { dir, process }
    }

    fn args(dir: &tempfile::TempDir) -> [&str; 8] {
        let dir = dir.path().to_str().expect("a UTF-8 temp dir");
        [
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--dir",
            dir,
        ]
    }

    fn url(&self) -> String {
        self.process.url()
    }

    /// Starts it again on the same port and dir, after a kill.
    async fn spawn(&mut self) {
        let port = self.process.port;
        let mut args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(Self::args(&self.dir).iter().map(|s| (*s).to_owned()));
        self.process = RedisProcess::start(port, &args).await;
    }

    async fn kill9(&mut self) {
        self.process.kill9().await;
    }

    async fn command(&self, args: &[&str]) -> String {
        self.process.cli(args).await
    }
}

/// Reads `n` events from `stream`, returning their ids.
async fn ids(stream: &mut Sse, n: usize) -> Vec<u64> {
    stream
        .events(n)
        .await
        .iter()
        .map(common::Event::pos)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_message_once_in_one_order() {
    let redis = shared_redis();
    let prefix = prefix("order");
    let nodes = [
        node(&redis, &prefix, &[]).await,
        node(&redis, &prefix, &[]).await,
        node(&redis, &prefix, &[]).await,
    ];
    let mut streams = Vec::new();
    for i in 0..30 {
        let uid = uid(&format!("cluster-{i}"));
        // Connected through one node, listening on another.
        nodes[i % 3].connect(&uid, ":news").await;
        streams.push(nodes[(i + 1) % 3].listen(&uid).await);
    }
    let publishers = nodes.iter().enumerate().map(|(n, node)| async move {
        let mut ids = Vec::new();
        for i in 0..30 {
            ids.push(node.publish(":news", json!({"node": n, "i": i})).await);
        }
        ids
    });
    let mut published: Vec<u64> = futures_util::future::join_all(publishers)
        .await
        .into_iter()
        .flatten()
        .collect();
    published.sort_unstable();
    let mut first_order = None;
    for stream in &mut streams {
        let got = ids(stream, 90).await;
        let unique: HashSet<_> = got.iter().collect();
        assert_eq!(unique.len(), 90, "no duplicate");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "publish order");
        assert_eq!(got, published, "every message, once");
        match &first_order {
            None => first_order = Some(got),
            Some(order) => assert_eq!(&got, order, "one order on every node"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_moves_to_another_node_and_resumes_with_no_gap_and_no_duplicate() {
    let redis = shared_redis();
    let prefix = prefix("move");
    let a = node(&redis, &prefix, &[]).await;
    let b = node(&redis, &prefix, &[]).await;
    let uid = uid("mover");
    a.connect(&uid, ":data").await;
    let mut on_a = a.listen(&uid).await;
    let mut first = Vec::new();
    for i in 0..5 {
        first.push(a.publish(":data", json!(i)).await);
    }
    assert_eq!(ids(&mut on_a, 5).await, first);
    drop(on_a);
    let mut later = Vec::new();
    for i in 5..10 {
        later.push(b.publish(":data", json!(i)).await);
    }
    let last = first[4].to_string();
    let mut on_b = Sse::open(&b.listen_url(&uid, ""), Some(&last))
        .await
        .expect("open on b");
    assert_eq!(ids(&mut on_b, 5).await, later);
    let live = a.publish(":data", json!("live")).await;
    assert_eq!(ids(&mut on_b, 1).await, vec![live]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_loses_no_acknowledged_message() {
    let redis = shared_redis();
    let prefix = prefix("kill");
    let mut a = node_process(&redis, &prefix, &[]).await;
    let b = node(&redis, &prefix, &[]).await;
    let uid = uid("survivor");
    b.connect(&uid, ":data").await;
    let mut stream = a.listen(&uid).await;
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        acknowledged.push(a.publish(":data", json!(i)).await);
    }
    let got_before = ids(&mut stream, 5).await;
    a.kill9().await;
    drop(stream);
    for i in 10..20 {
        acknowledged.push(b.publish(":data", json!(i)).await);
    }
    let last = got_before[4].to_string();
    let mut resumed = Sse::open(&b.listen_url(&uid, ""), Some(&last))
        .await
        .expect("open on b");
    let got_after = ids(&mut resumed, 15).await;
    let mut got = got_before;
    got.extend(got_after);
    assert_eq!(got, acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_reset_hold_across_nodes() {
    let redis = shared_redis();
    let prefix = prefix("reset");
    let a = node(&redis, &prefix, &["--max-stored-messages", "5"]).await;
    let b = node(&redis, &prefix, &["--max-stored-messages", "5"]).await;
    let uid = uid("reset");
    a.connect(&uid, ":data").await;
    let mut last = 0;
    for i in 0..20 {
        last = b.publish(":data", json!(i)).await;
    }
    let mut stream = Sse::open(&a.listen_url(&uid, "?last_event_id=0"), None)
        .await
        .expect("open");
    let reset = stream.next_event().await;
    assert!(reset.is_reset(), "{reset:?}");
    assert_eq!(reset.pos(), last);
    let live = b.publish(":data", json!("after")).await;
    assert_eq!(ids(&mut stream, 1).await, vec![live]);
    let stats = a.stats().await;
    assert!(
        stats["messages_stored"].as_u64().expect("count") <= 6,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_stream_loses_nothing_and_streams_stay_open() {
    let mut redis = OwnRedis::start().await;
    let prefix = prefix("restart");
    let a = node(&redis.url(), &prefix, &[]).await;
    let b = node(&redis.url(), &prefix, &[]).await;
    let uid = uid("steadfast");
    a.connect(&uid, ":data").await;
    let mut stream = b.listen(&uid).await;
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        acknowledged.push(a.publish(":data", json!(i)).await);
    }
    assert_eq!(ids(&mut stream, 10).await, acknowledged);

    redis.kill9().await;
    // Publishing fails fast and clearly while Redis is away; health says so.
    let started = Instant::now();
    let (status, body) = a
        .api("update", json!({"track": ":data", "message": "lost?"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "no hang: {:?}",
        started.elapsed()
    );
    common::eventually("healthz to turn unhealthy", WAIT, || async {
        (!a.healthy().await).then_some(())
    })
    .await;

    redis.spawn().await;
    common::eventually("healthz to recover", WAIT, || async {
        a.healthy().await.then_some(())
    })
    .await;
    for i in 10..20 {
        acknowledged.push(a.publish(":data", json!(i)).await);
    }
    // The same stream, never reopened, gets the rest, in order, nothing twice.
    assert_eq!(ids(&mut stream, 10).await, acknowledged[10..].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_gives_503_not_a_hang_and_then_catches_up() {
    let redis = OwnRedis::start().await;
    let prefix = prefix("pause");
    let a = node(&redis.url(), &prefix, &[]).await;
    let uid = uid("patient");
    a.connect(&uid, ":data").await;
    let mut stream = a.listen(&uid).await;
    let first = a.publish(":data", json!("before")).await;
    assert_eq!(ids(&mut stream, 1).await, vec![first]);
    assert_eq!(
        redis.command(&["CLIENT", "PAUSE", "4000", "ALL"]).await,
        "OK"
    );
    let started = Instant::now();
    let (status, body) = within(
        "update while redis is paused",
        WAIT,
        a.api("update", json!({"track": ":data", "message": "paused"})),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "no hang: {:?}",
        started.elapsed()
    );
    assert_eq!(status, 503, "{body}");
    // After the pause everything works again, and the stream carries on.
    tokio::time::sleep(Duration::from_millis(4200).saturating_sub(started.elapsed())).await;
    let after = common::eventually("a publish after the pause", WAIT, || async {
        let (status, body) = a
            .api("update", json!({"track": ":data", "message": "after"}))
            .await;
        (status == 200).then(|| common::id_of(&body["id"]))
    })
    .await;
    // The update refused during the pause may still have been applied once the pause
    // ended; either way the stream carries on in order up to the acknowledged one.
    let seen = within("the acknowledged message on the open stream", WAIT, async {
        let mut seen = vec![first];
        while !seen.contains(&after) {
            seen.extend(ids(&mut stream, 1).await);
        }
        seen
    })
    .await;
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "in order, nothing twice: {seen:?}"
    );
}

/// A WebSocket whose stream cannot read the store closes with 1011, and a new one
/// opens once the store answers again. The fault is real: Redis paused for writes
/// still answers the listener lookup (a plain read), but not the replay, which runs as
/// a script (Redis holds every script that may write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_closes_1011_when_the_store_fails_under_it() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let redis = OwnRedis::start().await;
    let prefix = prefix("ws1011");
    let a = node(&redis.url(), &prefix, &[]).await;
    let uid = uid("storeless");
    a.connect(&uid, ":data").await;
    let id = a.publish(":data", json!("kept")).await;
    let url = format!("ws://{}/ws/{uid}", a.addr());

    assert_eq!(
        redis.command(&["CLIENT", "PAUSE", "6000", "WRITE"]).await,
        "OK"
    );
    let (mut socket, _) = within(
        "the handshake while Redis is paused",
        WAIT,
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await
    .expect("upgraded: the listener lookup is a read");
    let close = within("the close frame", WAIT, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a close code");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1011, "store_unavailable")
    );

    assert_eq!(redis.command(&["CLIENT", "UNPAUSE"]).await, "OK");
    let (mut socket, _) = within(
        "the handshake after the pause",
        WAIT,
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await
    .expect("upgraded");
    let frame = within("the kept message", WAIT, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return text,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected the message, got {other:?}"),
            }
        }
    })
    .await;
    let frame: serde_json::Value = serde_json::from_str(&frame).expect("json");
    assert_eq!(common::id_of(&frame["id"]), id, "{frame}");
}
