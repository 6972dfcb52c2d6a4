//! Redis failover through Sentinel, with real processes on loopback ports: a primary, a
//! replica and three sentinels (`redis-server --sentinel`), two nodes following them
//! (`--redis redis+sentinel://…`, run as processes), publishers and SSE listeners
//! running — then the primary is killed with -9.
//!
//! To make the failover lose writes for sure (on loopback a replica otherwise has
//! everything the instant the primary dies), the replica is stopped (SIGSTOP) and its
//! link dropped (`CLIENT KILL TYPE replica`) a moment before the kill: what the primary
//! takes in that moment only it has. Then:
//!
//! - with `--redis-min-replicas 1` those updates answer `503 store_not_replicated`, and
//!   every update acknowledged reaches every listener, once, in order;
//! - without it they are acknowledged and lost, and every listener either gets every
//!   acknowledged update or a `reset` in its place — never a silent gap, never another
//!   message under an acknowledged id.
//!
//! The nodes notice the lost tail (the new primary's `seq` is behind what they saw) and
//! start a new epoch; the streams from before it get their reset.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{RedisProcess, Server, Sse, free_port, to_event, uid};
use serde_json::json;

const MASTER: &str = "dolores-test";
const TRACKS: [&str; 2] = ["fo-a", "fo-b"];

/// A primary, its two replicas and three sentinels watching them. Two replicas, so
/// that after a failover the new primary still has one (`--redis-min-replicas 1`
/// refuses every update without).
struct Sentinels {
    _dir: tempfile::TempDir,
    primary: RedisProcess,
    replicas: Vec<RedisProcess>,
    sentinels: Vec<RedisProcess>,
}

impl Sentinels {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_string_lossy().into_owned();
        let server = |port: u16| -> Vec<String> {
            [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &path,
                "--dbfilename",
                &format!("dump-{port}.rdb"),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
        };
        let primary_port = free_port();
        let primary = RedisProcess::start(primary_port, &server(primary_port)).await;
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let port = free_port();
            let mut args = server(port);
            args.extend([
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary_port.to_string(),
            ]);
            replicas.push(RedisProcess::start(port, &args).await);
        }
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {path}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 4000\n\
                     sentinel parallel-syncs {MASTER} 1\n"
                ),
            )
            .expect("sentinel.conf");
            let args = vec![conf.to_string_lossy().into_owned(), "--sentinel".into()];
            sentinels.push(RedisProcess::start(port, &args).await);
        }
        let cluster = Self {
            _dir: dir,
            primary,
            replicas,
            sentinels,
        };
        cluster.wait_until_ready().await;
        cluster
    }

    /// Until the replica is in sync and every sentinel knows the replica and the two
    /// other sentinels (without them, no failover can be agreed).
    async fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ready = true;
            for replica in &self.replicas {
                let info = replica.cli(&["INFO", "replication"]).await;
                ready &= info.contains("master_link_status:up");
            }
            for sentinel in &self.sentinels {
                let master = sentinel.cli(&["SENTINEL", "MASTER", MASTER]).await;
                let fields: Vec<&str> = master.lines().collect();
                let field = |name: &str| {
                    fields
                        .iter()
                        .position(|f| *f == name)
                        .and_then(|i| fields.get(i + 1))
                        .copied()
                        .unwrap_or("")
                };
                ready &= field("num-slaves") == "2" && field("num-other-sentinels") == "2";
            }
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not find each other and the replica"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{MASTER}", hosts.join(","))
    }

    /// Until the sentinels name a replica as the primary; returns it.
    async fn wait_for_failover(&self) -> &RedisProcess {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = self.sentinels[0]
                .cli(&["SENTINEL", "get-master-addr-by-name", MASTER])
                .await;
            let port = answer.lines().nth(1).unwrap_or("");
            if let Some(promoted) = self.replicas.iter().find(|r| r.port.to_string() == port) {
                return promoted;
            }
            assert!(Instant::now() < deadline, "no failover: {answer}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What a listener saw: messages (id, track, text) and resets (id), in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Message(u64, String, String),
    Reset(u64),
}

/// What a publisher got acknowledged: id → (track, text).
type Acked = Arc<Mutex<BTreeMap<u64, (String, String)>>>;

/// Publishes to `node` until `stop`, each update with its text as Idempotency-Key; one
/// that is not acknowledged is left for later and the next one sent (so writes go on
/// while a failover is pending), then, once stopped, each left one is sent again with
/// its key until it is acknowledged. Counts the answers by code.
async fn publisher(
    url: String,
    api_key: String,
    name: String,
    acked: Acked,
    codes: Arc<Mutex<HashMap<String, u64>>>,
    stop: Arc<AtomicBool>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let publish = |track: &'static str, text: String| {
        let (client, url, api_key, acked, codes) =
            (&client, &url, &api_key, acked.clone(), codes.clone());
        async move {
            let sent = client
                .post(format!("{url}/api/v1/update"))
                .bearer_auth(api_key)
                .header("Idempotency-Key", &text)
                .json(&json!({"track": track, "message": text}))
                .send()
                .await;
            let mut done = false;
            let code = match sent {
                Ok(response) if response.status() == 200 => {
                    let body: serde_json::Value = response.json().await.unwrap_or_default();
                    match body["id"].as_str().and_then(|id| id.parse().ok()) {
                        Some(id) => {
                            acked
                                .lock()
                                .expect("acked")
                                .insert(id, (track.to_owned(), text.clone()));
                            done = true;
                            "200".to_owned()
                        }
                        None => "bad 200".to_owned(),
                    }
                }
                Ok(response) => {
                    let body: serde_json::Value = response.json().await.unwrap_or_default();
                    body["error"]["code"].as_str().unwrap_or("?").to_owned()
                }
                Err(_) => "no answer".to_owned(),
            };
            *codes.lock().expect("codes").entry(code).or_default() += 1;
            done
        }
    };
    let mut left = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let track = TRACKS[(n % 2) as usize];
        let text = format!("{name}-{n}");
        if !publish(track, text.clone()).await {
            left.push((track, text));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for (track, text) in left {
        while !publish(track, text.clone()).await {
            assert!(Instant::now() < deadline, "{text} is never acknowledged");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Listens as `uid` until `stop` and the last message has an id at least `until` (set
/// at the end), reconnecting (alternating nodes) with its last id as Last-Event-ID.
async fn listener(
    urls: Vec<String>,
    uid: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    until: Arc<Mutex<Option<u64>>>,
) {
    let mut last: Option<String> = None;
    let mut attempt = 0usize;
    loop {
        let url = &urls[attempt % urls.len()];
        attempt += 1;
        let done = |seen: &[Seen]| {
            let until = *until.lock().expect("until");
            until.is_some_and(|until| {
                seen.last().map(|s| match s {
                    Seen::Message(id, ..) | Seen::Reset(id) => *id,
                }) >= Some(until)
            })
        };
        if done(&seen.lock().expect("seen")) {
            return;
        }
        let Ok(mut stream) = Sse::open(&format!("{url}/listen/{uid}"), last.as_deref()).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            match stream.try_next_block(Duration::from_millis(300)).await {
                Some(Some(block)) => {
                    let Some(event) = to_event(block) else {
                        continue;
                    };
                    let mut seen = seen.lock().expect("seen");
                    if event.is_reset() {
                        seen.push(Seen::Reset(event.pos()));
                    } else {
                        seen.push(Seen::Message(
                            event.pos(),
                            event.track().to_owned(),
                            event.message().as_str().unwrap_or("").to_owned(),
                        ));
                    }
                    last = Some(event.id.clone());
                }
                Some(None) => break,
                None => {
                    if done(&seen.lock().expect("seen")) {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one run saw.
struct Outcome {
    acked: BTreeMap<u64, (String, String)>,
    /// Per listener: its tracks and what it saw.
    listeners: Vec<(Vec<&'static str>, Vec<Seen>)>,
    codes: HashMap<String, u64>,
    /// Acknowledged updates the new primary does not have.
    lost_from_store: Vec<u64>,
}

async fn run(min_replicas: u32) -> Outcome {
    let mut redis = Sentinels::start().await;
    let prefix = format!("dolores-failover-{}-{min_replicas}", std::process::id());
    let node = || {
        Server::config()
            .args(["--redis", &redis.url(), "--redis-prefix", &prefix])
            .args(["--redis-min-replicas", &min_replicas.to_string()])
            .spawn()
    };
    let a = node().await;
    let b = node().await;
    let urls = vec![a.url(), b.url()];
    // Listeners on one track or both, streams on either node.
    let subscriptions: Vec<Vec<&'static str>> = vec![
        vec![TRACKS[0]],
        vec![TRACKS[1]],
        TRACKS.to_vec(),
        TRACKS.to_vec(),
    ];
    let until = Arc::new(Mutex::new(None));
    let mut listeners = Vec::new();
    for (i, tracks) in subscriptions.iter().enumerate() {
        let uid = uid("failover");
        for track in tracks {
            let (status, body) = a.api("connect", json!({"uid": uid, "track": track})).await;
            assert_eq!(status, 200, "{body}");
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut order = urls.clone();
        order.rotate_left(i % 2);
        listeners.push((
            seen.clone(),
            tokio::spawn(listener(order, uid, seen, until.clone())),
        ));
    }
    let acked: Acked = Arc::default();
    let codes = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = [&a, &b]
        .iter()
        .enumerate()
        .map(|(i, node)| {
            tokio::spawn(publisher(
                node.url(),
                node.api_key().to_owned(),
                format!("p{i}"),
                acked.clone(),
                codes.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The replicas fall behind for good: stopped, their links dropped; then the
    // primary dies.
    for replica in &redis.replicas {
        replica.signal("-STOP").await;
    }
    redis
        .primary
        .cli(&["CLIENT", "KILL", "TYPE", "replica"])
        .await;
    // Longer than an append waits for its replicas (1 s), so that with
    // --redis-min-replicas some answer store_not_replicated.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.primary.kill9().await;
    for replica in &redis.replicas {
        replica.signal("-CONT").await;
    }
    let before = acked.lock().expect("acked").len();
    let promoted = redis.wait_for_failover().await.port;
    // Traffic after the failover: until 40 more updates are acknowledged.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().expect("acked").len() < before + 40 {
        assert!(
            Instant::now() < deadline,
            "no update acknowledged after the failover: {:?}",
            codes.lock().expect("codes")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    // A last update per track: every listener ends there.
    let mut last = 0;
    for track in TRACKS {
        let (status, body) = a
            .api("update", json!({"track": track, "message": "end"}))
            .await;
        assert_eq!(status, 200, "{body}");
        let id: u64 = body["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("id");
        acked
            .lock()
            .expect("acked")
            .insert(id, (track.to_owned(), "end".to_owned()));
        last = last.max(id);
    }
    // A listener on one track ends with that track's last update.
    let ends: Vec<u64> = {
        let acked = acked.lock().expect("acked");
        TRACKS
            .iter()
            .map(|t| {
                acked
                    .iter()
                    .rev()
                    .find(|(_, (track, _))| track == t)
                    .map_or(0, |(id, _)| *id)
            })
            .collect()
    };
    *until.lock().expect("until") = Some(ends.iter().copied().min().unwrap_or(last));
    let mut seen_by = Vec::new();
    for ((seen, task), tracks) in listeners.into_iter().zip(subscriptions) {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "a listener on {tracks:?} did not catch up; it saw {:?}",
                    seen.lock()
                        .expect("seen")
                        .iter()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                )
            })
            .expect("listener");
        seen_by.push((tracks, seen.lock().expect("seen").clone()));
    }
    let acked = acked.lock().expect("acked").clone();
    let codes = codes.lock().expect("codes").clone();
    let log = redis
        .replicas
        .iter()
        .find(|r| r.port == promoted)
        .expect("the new primary")
        .cli(&["XRANGE", &format!("{prefix}:log"), "-", "+"])
        .await;
    let stored: std::collections::HashSet<u64> = log
        .lines()
        .filter_map(|line| line.strip_suffix("-0"))
        .filter_map(|id| id.parse().ok())
        .collect();
    let lost_from_store = acked
        .keys()
        .filter(|id| !stored.contains(id))
        .copied()
        .collect();
    drop((a, b));
    Outcome {
        acked,
        listeners: seen_by,
        codes,
        lost_from_store,
    }
}

/// Checks what every listener may be sure of, with or without `--redis-min-replicas`:
/// ids only grow (no duplicate, publish order), and an acknowledged id always carries
/// the acknowledged message. Returns, per listener, the acknowledged updates of its
/// tracks it never got, each with whether a reset stood in its place.
fn check(outcome: &Outcome) -> Vec<Vec<(u64, bool)>> {
    let mut missing_by = Vec::new();
    for (tracks, seen) in &outcome.listeners {
        let mut previous = 0;
        for event in seen {
            let (Seen::Message(id, ..) | Seen::Reset(id)) = event;
            assert!(
                *id > previous || matches!(event, Seen::Reset(_)) && *id >= previous,
                "ids go back or repeat at {event:?} (after {previous}) for {tracks:?}"
            );
            previous = *id;
            if let Seen::Message(id, track, text) = event
                && let Some((acked_track, acked_text)) = outcome.acked.get(id)
            {
                assert_eq!(
                    (track, text),
                    (acked_track, acked_text),
                    "id {id} carried another message than the one acknowledged"
                );
            }
        }
        let received: Vec<u64> = seen
            .iter()
            .filter_map(|s| match s {
                Seen::Message(id, ..) => Some(*id),
                Seen::Reset(_) => None,
            })
            .collect();
        let mut missing = Vec::new();
        for (id, (track, _)) in &outcome.acked {
            if !tracks.contains(&track.as_str()) || received.contains(id) {
                continue;
            }
            // A reset stands in for it when it came after the last message before it and
            // before the first message after it.
            let before = seen
                .iter()
                .rposition(|s| matches!(s, Seen::Message(m, ..) if m < id));
            let after = seen
                .iter()
                .position(|s| matches!(s, Seen::Message(m, ..) if m > id))
                .unwrap_or(seen.len());
            let covered = seen.iter().enumerate().any(|(i, s)| {
                matches!(s, Seen::Reset(_)) && before.is_none_or(|b| i > b) && i < after
            });
            missing.push((*id, covered));
        }
        missing_by.push(missing);
    }
    missing_by
}

fn summary(outcome: &Outcome) -> String {
    let resets: Vec<usize> = outcome
        .listeners
        .iter()
        .map(|(_, seen)| seen.iter().filter(|s| matches!(s, Seen::Reset(_))).count())
        .collect();
    let unacknowledged: Vec<usize> = outcome
        .listeners
        .iter()
        .map(|(_, seen)| {
            seen.iter()
                .filter(|s| matches!(s, Seen::Message(id, ..) if !outcome.acked.contains_key(id)))
                .count()
        })
        .collect();
    format!(
        "{} acknowledged, {} of them lost from the store; answers {:?}; resets per listener \
         {resets:?}; unacknowledged messages seen per listener {unacknowledged:?}",
        outcome.acked.len(),
        outcome.lost_from_store.len(),
        outcome.codes
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_min_replicas_every_acknowledged_update_survives_a_failover() {
    let outcome = run(1).await;
    eprintln!("{}", summary(&outcome));
    let missing = check(&outcome);
    for ((tracks, _), missing) in outcome.listeners.iter().zip(&missing) {
        assert!(
            missing.is_empty(),
            "a listener on {tracks:?} never got acknowledged updates {missing:?} ({})",
            summary(&outcome)
        );
    }
    assert!(
        outcome.lost_from_store.is_empty(),
        "acknowledged updates are gone from the new primary: {:?}",
        outcome.lost_from_store
    );
    assert!(
        outcome
            .codes
            .get("store_not_replicated")
            .copied()
            .unwrap_or(0)
            > 0,
        "while the replica was cut off, an update answers store_not_replicated ({})",
        summary(&outcome)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_min_replicas_a_lost_update_is_a_reset_never_a_silent_gap() {
    let outcome = run(0).await;
    eprintln!("{}", summary(&outcome));
    let missing = check(&outcome);
    for ((tracks, seen), missing) in outcome.listeners.iter().zip(&missing) {
        let silent: Vec<u64> = missing
            .iter()
            .filter(|(_, covered)| !covered)
            .map(|(id, _)| *id)
            .collect();
        assert!(
            silent.is_empty(),
            "a listener on {tracks:?} silently missed acknowledged updates {silent:?} ({})",
            summary(&outcome)
        );
        // Every listener was given what the failover lost: it must have been told.
        assert!(
            seen.iter().any(|s| matches!(s, Seen::Reset(_))),
            "a listener on {tracks:?} got no reset ({})",
            summary(&outcome)
        );
    }
    // The setup did lose acknowledged updates: otherwise this test proves nothing.
    assert!(
        !outcome.lost_from_store.is_empty(),
        "the failover lost nothing acknowledged ({})",
        summary(&outcome)
    );
}

/// A tail reader that cannot read (here: an ACL that takes `XREAD` from the node's Redis
/// user, as a wrong ACL or a proxy that drops blocking reads would) while updates still
/// go through: the node's streams get nothing new, and `/healthz` must say so instead
/// of staying green; once the reader reads again, the streams catch up and it is green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_while_the_tail_reader_is_wedged() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(["--dir".into(), dir.path().to_string_lossy().into_owned()])
    .collect();
    let redis = RedisProcess::start(port, &args).await;
    assert_eq!(
        redis
            .cli(&[
                "ACL", "SETUSER", "dolores", "on", ">secret", "~*", "&*", "+@all"
            ])
            .await,
        "OK"
    );
    let node = Server::config()
        .args([
            "--redis",
            &format!("redis://dolores:secret@127.0.0.1:{port}/0"),
            "--redis-prefix",
            "wedge",
        ])
        .start()
        .await;
    let listener = uid("wedge");
    node.connect(&listener, "w").await;
    let mut stream = node.listen(&listener).await;
    let first = node.publish("w", json!("before")).await;
    assert_eq!(stream.next_event().await.pos(), first);
    assert!(node.healthy().await);

    assert_eq!(
        redis.cli(&["ACL", "SETUSER", "dolores", "-xread"]).await,
        "OK"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut published = Vec::new();
    // Its read errors may show as a store failure at once; within a few seconds the
    // node must say what is wrong: it no longer follows the log.
    let answer = loop {
        published.push(node.publish("w", json!(published.len())).await);
        let (status, body) = node.get("/healthz").await;
        let message = body["error"]["message"].as_str().unwrap_or("");
        if status == 503 && message.contains("tail reader is wedged") {
            break body;
        }
        assert!(Instant::now() < deadline, "/healthz: {status} {body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(answer["status"], "store_unavailable", "{answer}");
    // It stays red while the reader is stuck, not one probe in a few.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(node.get("/healthz").await.0, 503);
    }

    assert_eq!(
        redis.cli(&["ACL", "SETUSER", "dolores", "+xread"]).await,
        "OK"
    );
    let caught_up: Vec<u64> = stream
        .events(published.len())
        .await
        .iter()
        .map(common::Event::pos)
        .collect();
    assert_eq!(caught_up, published, "the stream catches up, in order");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.healthy().await {
        assert!(
            Instant::now() < deadline,
            "/healthz did not turn green again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A switchover on purpose (`SENTINEL FAILOVER`, as for maintenance): the old primary
/// stays up and becomes a replica. The node's connections leave it (its writes answer
/// READONLY, its blocked reads are cut) for the new primary, and a listener gets every
/// acknowledged update, or a reset where one may be missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_is_followed_by_every_connection() {
    let redis = Sentinels::start().await;
    let prefix = format!("dolores-switchover-{}", std::process::id());
    let node = Server::config()
        .args(["--redis", &redis.url(), "--redis-prefix", &prefix])
        .start()
        .await;
    let listener = uid("switch");
    node.connect(&listener, TRACKS[0]).await;
    let mut stream = node.listen(&listener).await;
    let mut acked = Vec::new();
    for n in 0..10 {
        acked.push(node.publish(TRACKS[0], json!(n)).await);
    }
    let answer = redis.sentinels[0]
        .cli(&["SENTINEL", "FAILOVER", MASTER])
        .await;
    assert_eq!(answer, "OK");
    redis.wait_for_failover().await;
    // Updates go through again, to the new primary (retried with their key).
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 10..20 {
        loop {
            let response = node
                .client()
                .post(format!("{}/api/v1/update", node.url()))
                .bearer_auth(node.api_key())
                .header("Idempotency-Key", format!("switch-{n}"))
                .json(&json!({"track": TRACKS[0], "message": n}))
                .send()
                .await
                .expect("update");
            if response.status() == 200 {
                let body: serde_json::Value = response.json().await.expect("json");
                acked.push(
                    body["id"]
                        .as_str()
                        .and_then(|id| id.parse().ok())
                        .expect("id"),
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no update through after the switchover"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let last = *acked.last().expect("acked");
    let mut got = Vec::new();
    let mut reset = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut cursor: Option<String> = None;
    while got.last() != Some(&last) {
        assert!(Instant::now() < deadline, "the listener stopped at {got:?}");
        match stream.try_next_block(Duration::from_millis(500)).await {
            Some(Some(block)) => {
                if let Some(event) = to_event(block) {
                    reset |= event.is_reset();
                    if !event.is_reset() {
                        got.push(event.pos());
                    }
                    cursor = Some(event.id);
                }
            }
            Some(None) => {
                // The stream ended (its replay failed during the switchover): resume.
                if let Ok(again) =
                    Sse::open(&node.listen_url(&listener, ""), cursor.as_deref()).await
                {
                    stream = again;
                }
            }
            None => {}
        }
    }
    let mut sorted = got.clone();
    sorted.dedup();
    assert_eq!(sorted, got, "no duplicate");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    if !reset {
        assert_eq!(got, acked, "without a reset, every acknowledged update");
    }
}

/// A Redis that comes back without its data (no persistence) while a node runs: the node
/// saw positions the new log does not have, so the log starts a new epoch, past them,
/// and no old id is handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_without_its_data_starts_a_new_epoch() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(["--dir".into(), dir.path().to_string_lossy().into_owned()])
    .collect();
    let mut redis = RedisProcess::start(port, &args).await;
    let node = Server::config()
        .args([
            "--redis",
            &format!("redis://127.0.0.1:{port}/0"),
            "--redis-prefix",
            "nodata",
        ])
        .start()
        .await;
    let listener = uid("nodata");
    node.connect(&listener, "n").await;
    let mut stream = node.listen(&listener).await;
    let mut old = Vec::new();
    for n in 0..5 {
        old.push(node.publish("n", json!(n)).await);
    }
    let got: Vec<u64> = stream
        .events(5)
        .await
        .iter()
        .map(common::Event::pos)
        .collect();
    assert_eq!(got, old);

    redis.kill9().await;
    let redis = RedisProcess::start(port, &args).await;
    // The app subscribes its listener again (the listener is gone with the data).
    let deadline = Instant::now() + Duration::from_secs(20);
    while node
        .api("connect", json!({"uid": listener, "track": "n"}))
        .await
        .0
        != 200
    {
        assert!(Instant::now() < deadline, "no connect after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new = node.publish("n", json!("after")).await;
    assert!(new > old[4], "a new epoch: {new} is past {:?}", old);
    let epoch: u64 = redis
        .cli(&["GET", "nodata:epoch"])
        .await
        .parse()
        .expect("an epoch is stored");
    assert!(epoch > old[4] && epoch < new, "{epoch}");
    // The open stream (or its resume) is told, then gets what follows.
    let mut cursor = Some(old[4].to_string());
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !events
        .iter()
        .any(|e: &common::Event| e.id == new.to_string())
    {
        assert!(Instant::now() < deadline, "got {events:?}");
        match stream.try_next_block(Duration::from_millis(500)).await {
            Some(Some(block)) => {
                if let Some(event) = to_event(block) {
                    cursor = Some(event.id.clone());
                    events.push(event);
                }
            }
            Some(None) => {
                if let Ok(again) =
                    Sse::open(&node.listen_url(&listener, ""), cursor.as_deref()).await
                {
                    stream = again;
                }
            }
            None => {}
        }
    }
    // Its subscription began in the new epoch (the app subscribed it again), so it
    // missed nothing and needs no reset; what it gets has only new ids.
    assert!(
        events.iter().all(|e| e.pos() > old[4]),
        "only new ids: {events:?}"
    );
}
