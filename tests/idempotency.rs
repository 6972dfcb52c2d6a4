//! Safe retries: `POST /api/v1/update` with an `Idempotency-Key` stores once, however
//! often it is sent — on each engine, across nodes on Redis, across a `kill -9` of the
//! embedded server, and after a `503` that hid a commit (Redis paused). The CLI sends a
//! key of its own and reuses it on its retries.

mod common;

use common::{RedisProcess, Server, Sse, WAIT, assert_error, id_of, read_json, uid, within};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `POST /api/v1/update` with `body` and these `Idempotency-Key` header values (none,
/// one, or several to test the refusal); also says whether the answer was marked as a
/// repeat (`Idempotent-Replayed: true`).
async fn update_with(server: &Server, keys: &[&[u8]], body: Value) -> (StatusCode, Value, bool) {
    let mut request = server
        .client()
        .post(format!("{}/api/v1/update", server.url()))
        .bearer_auth(server.api_key())
        .json(&body);
    for key in keys {
        let value = reqwest::header::HeaderValue::from_bytes(key).expect("a header value");
        request = request.header("Idempotency-Key", value);
    }
    let response = request.send().await.expect("POST /api/v1/update");
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let (status, body) = read_json(response).await;
    (status, body, replayed)
}

/// Publishes `message` to `track` with `key`; expects a 200 and returns its id and
/// whether it was a repeat.
async fn publish_keyed(server: &Server, key: &str, track: &str, message: Value) -> (u64, bool) {
    let (status, body, replayed) = update_with(
        server,
        &[key.as_bytes()],
        json!({"track": track, "message": message}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "update: {body}");
    (id_of(&body["id"]), replayed)
}

/// A key no other test (or earlier run on the shared Redis) uses.
fn fresh_key(name: &str) -> String {
    format!("{}-{}", uid(name), rand_suffix())
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn shared_redis() -> String {
    std::env::var("DOLORES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

async fn redis_node(redis: &str, prefix: &str) -> Server {
    Server::config()
        .args(["--redis", redis, "--redis-prefix", prefix])
        .start()
        .await
}

/// Reads events up to and including the one with id `last`; returns their ids and
/// messages.
async fn events_through(stream: &mut Sse, last: u64) -> Vec<(u64, Value)> {
    within("the events up to the marker", WAIT, async {
        let mut seen = Vec::new();
        loop {
            let event = stream.next_event().await;
            let pos = event.pos();
            seen.push((pos, event.data["message"].clone()));
            if pos >= last {
                return seen;
            }
        }
    })
    .await
}

/// The same key twice (one message, then a batch): the same ids, stored once, and a
/// listener gets each message once.
async fn a_repeated_key_stores_once(server: Server) {
    let listener = uid("idem");
    server.connect(&listener, ":data").await;
    let mut stream = server.listen(&listener).await;
    let key = fresh_key("one");
    let (first, replayed) = publish_keyed(&server, &key, ":data", json!("once")).await;
    assert!(!replayed, "the first time is not a repeat");
    let (again, replayed) = publish_keyed(&server, &key, ":data", json!("once")).await;
    assert_eq!(again, first, "a repeat answers the first id");
    assert!(replayed, "and says it is a repeat");

    let batch_key = fresh_key("batch");
    let batch = json!({"updates": [
        {"track": ":data", "message": "b1"},
        {"track": ":data", "message": "b2"},
    ]});
    let (status, ids, replayed) =
        update_with(&server, &[batch_key.as_bytes()], batch.clone()).await;
    assert_eq!(status, StatusCode::OK, "{ids}");
    assert!(!replayed);
    let (status, ids_again, replayed) = update_with(&server, &[batch_key.as_bytes()], batch).await;
    assert_eq!(status, StatusCode::OK, "{ids_again}");
    assert_eq!(ids_again, ids, "a repeated batch answers the first ids");
    assert!(replayed);

    let marker = server.publish(":data", json!("marker")).await;
    let ids: Vec<u64> = ids["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(
        events_through(&mut stream, marker).await,
        vec![
            (first, json!("once")),
            (ids[0], json!("b1")),
            (ids[1], json!("b2")),
            (marker, json!("marker")),
        ],
        "each message once"
    );
}

#[tokio::test]
async fn a_repeated_key_stores_once_on_the_embedded_store() {
    a_repeated_key_stores_once(Server::start().await).await;
}

#[tokio::test]
async fn a_repeated_key_stores_once_in_memory() {
    a_repeated_key_stores_once(Server::config().memory().start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_stores_once_on_redis() {
    let prefix = format!("dolores-idem-one-{}", rand_suffix());
    a_repeated_key_stores_once(redis_node(&shared_redis(), &prefix).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sent_to_two_nodes_stores_once() {
    let redis = shared_redis();
    let prefix = format!("dolores-idem-nodes-{}", rand_suffix());
    let a = redis_node(&redis, &prefix).await;
    let b = redis_node(&redis, &prefix).await;
    let listener = uid("nodes");
    a.connect(&listener, ":data").await;
    let mut stream = b.listen(&listener).await;
    let key = fresh_key("nodes");
    let (first, _) = publish_keyed(&a, &key, ":data", json!("once")).await;
    let (again, replayed) = publish_keyed(&b, &key, ":data", json!("once")).await;
    assert_eq!(again, first);
    assert!(replayed, "the other node knows the key");
    let marker = b.publish(":data", json!("marker")).await;
    assert_eq!(
        events_through(&mut stream, marker).await,
        vec![(first, json!("once")), (marker, json!("marker"))]
    );
}

#[tokio::test]
async fn a_key_is_remembered_across_a_kill_9_of_the_embedded_server() {
    let mut server = Server::spawn().await;
    let listener = uid("crash");
    server.connect(&listener, ":data").await;
    let key = fresh_key("crash");
    let (first, _) = publish_keyed(&server, &key, ":data", json!("once")).await;
    server.kill9().await;
    server.restart().await;
    let (again, replayed) = publish_keyed(&server, &key, ":data", json!("once")).await;
    assert_eq!(again, first);
    assert!(replayed, "the key was stored with the message");
    let marker = server.publish(":data", json!("marker")).await;
    let mut stream = server.listen(&listener).await;
    assert_eq!(
        events_through(&mut stream, marker).await,
        vec![(first, json!("once")), (marker, json!("marker"))]
    );
}

#[tokio::test]
async fn the_same_key_with_other_updates_is_refused_and_stores_nothing() {
    let server = Server::config().memory().start().await;
    let key = fresh_key("other");
    let (first, _) = publish_keyed(&server, &key, ":data", json!("first")).await;
    for other in [
        json!({"track": ":data", "message": "second"}),
        json!({"track": ":other", "message": "first"}),
        json!({"updates": [{"track": ":data", "message": "first"}, {"track": ":data", "message": "x"}]}),
    ] {
        let (status, body, _) = update_with(&server, &[key.as_bytes()], other).await;
        assert_error(&(status, body), 422, "idempotency_key_reused");
    }
    // The same updates again are still a repeat, and nothing else was stored.
    assert_eq!(
        publish_keyed(&server, &key, ":data", json!("first")).await,
        (first, true)
    );
    assert_eq!(server.stats().await["messages_stored"], 1);
}

#[tokio::test]
async fn a_bad_idempotency_key_is_400() {
    let server = Server::config().memory().start().await;
    let body = json!({"track": ":data", "message": 1});
    let long = vec![b'k'; 256];
    for keys in [
        vec![&b""[..]],
        vec![&long[..]],
        vec![&b"tab\there"[..]],
        vec![&b"caf\xc3\xa9"[..]],
        vec![&b"one"[..], &b"two"[..]],
    ] {
        let (status, answer, _) = update_with(&server, &keys, body.clone()).await;
        assert_error(&(status, answer), 400, "bad_idempotency_key");
    }
    assert_eq!(server.stats().await["messages_stored"], 0);
    // The longest key and every printable character are fine.
    let ok = [vec![b'k'; 255], b" !\"#~ key with spaces ~".to_vec()];
    for key in ok {
        let (status, answer, _) = update_with(&server, &[&key[..]], body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
}

// ---------------------------------------------------------------------------------
// The issue's finding: a 503 while Redis is paused, committed anyway.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_answered_503_while_redis_pauses_but_committed_is_stored_once_on_retry() {
    // Its own Redis: pausing the shared one would stall every other test.
    let redis = RedisProcess::start_with(&["--save", "", "--appendonly", "no"]).await;
    let node = redis_node(&redis.url(), "dolores-idem-pause").await;
    let listener = uid("pause");
    node.connect(&listener, ":data").await;
    let mut stream = node.listen(&listener).await;
    // A node that has published before: Redis knows the append script, so the call
    // held by the pause is the script itself, not a lookup that fails once it runs.
    let before = node.publish(":data", json!("before")).await;
    assert_eq!(stream.next_event().await.pos(), before);
    let key = fresh_key("pause");
    let body = json!({"track": ":data", "message": "paused"});

    // Writes (and so the append script) wait while Redis is paused; the node gives up
    // after its command timeout and answers 503 — but the script is already sent.
    assert_eq!(
        redis.cli(&["CLIENT", "PAUSE", "30000", "WRITE"]).await,
        "OK"
    );
    let (status, answer, _) = within(
        "the update while redis is paused",
        WAIT,
        update_with(&node, &[key.as_bytes()], body.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(redis.cli(&["CLIENT", "UNPAUSE"]).await, "OK");

    // The refused update was committed once Redis went on: the listener gets it.
    let committed = within("the refused update to arrive", WAIT, stream.next_event()).await;
    assert_eq!(committed.data["message"], "paused");

    // The publisher retries with its key: the same id, nothing stored again.
    let retried = common::eventually("a 200 for the retry", WAIT, || async {
        let (status, answer, replayed) = update_with(&node, &[key.as_bytes()], body.clone()).await;
        (status == StatusCode::OK).then(|| (id_of(&answer["id"]), replayed))
    })
    .await;
    assert_eq!(retried, (committed.pos(), true));
    let marker = node.publish(":data", json!("marker")).await;
    assert_eq!(
        events_through(&mut stream, marker).await,
        vec![(marker, json!("marker"))],
        "the retry delivered nothing twice"
    );
}

// ---------------------------------------------------------------------------------
// The CLI: one key per call, the same on every retry.
// ---------------------------------------------------------------------------------

/// Answers `503` to the first `refusals` requests and `200 {"id": "7"}` after; records
/// each request's `Idempotency-Key` (empty when none).
async fn flaky_server(refusals: usize) -> (String, tokio::task::JoinHandle<Vec<String>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let mut keys = Vec::new();
        while keys.len() <= refusals {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let head = read_request(&mut socket).await;
            let key = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("idempotency-key")
                        .then(|| value.trim().to_owned())
                })
                .unwrap_or_default();
            keys.push(key);
            let (status, body) = if keys.len() <= refusals {
                (
                    "503 Service Unavailable",
                    r#"{"error":{"code":"store_unavailable","message":"retry"}}"#,
                )
            } else {
                ("200 OK", r#"{"id":"7"}"#)
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(answer.as_bytes()).await.expect("write");
        }
        keys
    });
    (url, task)
}

/// Reads one request (head and body, by its `content-length`); returns the head.
async fn read_request(socket: &mut tokio::net::TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = socket.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the request ended early");
        bytes.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_owned();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if bytes.len() >= end + 4 + length {
                return head;
            }
        }
    }
}

#[tokio::test]
async fn the_cli_retries_an_update_on_503_with_the_same_key() {
    let (url, server) = flaky_server(2).await;
    let output = within(
        "dolores update",
        WAIT,
        common::command()
            .args([
                "update",
                ":data",
                "hello",
                "--server",
                &url,
                "--api-key",
                "k",
            ])
            .output(),
    )
    .await
    .expect("run dolores update");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        r#"{"id":"7"}"#
    );
    let keys = within("the flaky server's record", WAIT, server)
        .await
        .expect("server task");
    assert_eq!(keys.len(), 3, "two 503s, then the 200");
    assert!(!keys[0].is_empty(), "a key is sent: {keys:?}");
    assert!(
        keys.iter().all(|k| k == &keys[0]),
        "the same key each time: {keys:?}"
    );
}

#[tokio::test]
async fn the_cli_gives_up_after_its_tries_in_one_line() {
    let (url, _server) = flaky_server(usize::MAX).await;
    let output = within(
        "dolores update",
        WAIT,
        common::command()
            .args([
                "update",
                ":data",
                "hello",
                "--server",
                &url,
                "--api-key",
                "k",
            ])
            .output(),
    )
    .await
    .expect("run dolores update");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.contains("store_unavailable") && stderr.contains("tried 4 times"),
        "{stderr:?}"
    );
}

#[tokio::test]
async fn the_cli_sends_the_key_it_is_given() {
    let server = Server::config().memory().start().await;
    let update = || async {
        let output = within(
            "dolores update",
            WAIT,
            common::command()
                .args(["update", ":data", "hello", "--idempotency-key", "order-42"])
                .args(["--server", &server.url(), "--api-key", server.api_key()])
                .output(),
        )
        .await
        .expect("run dolores update");
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice::<Value>(&output.stdout).expect("json")
    };
    let first = update().await;
    assert_eq!(update().await, first);
    assert_eq!(server.stats().await["messages_stored"], 1);
}
