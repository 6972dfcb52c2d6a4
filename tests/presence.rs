//! Presence and the track API against the real binary: a track's counts and who is
//! online (exact on one node; within the stated bound on three Redis nodes, a killed
//! node's listeners included), its listeners page by page, its history with `reset`,
//! and the 400s for bad names and parameters.

mod common;

use std::time::{Duration, Instant};

use common::{Server, Sse, WAIT, assert_error, eventually, uid};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// How long a dead node's listeners may still count as online on Redis: the node key's
/// expiry (`presence::redis::NODE_TTL`, 3 s, as docs/presence.md states), plus a
/// second for the test's own polling and a loaded machine.
const CLUSTER_BOUND: Duration = Duration::from_secs(4);

/// `GET /api/v1/tracks/{track}{rest}` with `track` percent-encoded as one segment.
async fn track_get(server: &Server, track: &str, rest: &str) -> (StatusCode, Value) {
    let segment = track.replace('%', "%25").replace('/', "%2F");
    server.get(&format!("/api/v1/tracks/{segment}{rest}")).await
}

/// `(subscribers, online)` of `track`.
async fn counts(server: &Server, track: &str) -> (u64, u64) {
    let (status, body) = track_get(server, track, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["track"], track);
    (
        body["subscribers"].as_u64().expect("subscribers"),
        body["online"].as_u64().expect("online"),
    )
}

/// Every listener of `track` with `query`, following `next`, pages of `limit`: the
/// `(uid, online)` pairs and how many pages it took.
async fn all_listeners(
    server: &Server,
    track: &str,
    query: &str,
    limit: usize,
) -> (Vec<(String, bool)>, usize) {
    let mut listeners = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let (status, body) = track_get(
            server,
            track,
            &format!("/listeners?limit={limit}&after={after}{query}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        pages += 1;
        let page = body["listeners"].as_array().expect("listeners");
        assert!(page.len() <= limit, "a page holds at most limit: {body}");
        for item in page {
            assert!(item["last_seen"].as_str().is_some(), "last_seen: {item}");
            listeners.push((
                item["uid"].as_str().expect("uid").to_owned(),
                item["online"].as_bool().expect("online"),
            ));
        }
        match body.get("next").and_then(Value::as_str) {
            Some(next) => after = next.to_owned(),
            None => return (listeners, pages),
        }
        assert!(pages < 100, "pages never end");
    }
}

fn sorted(mut uids: Vec<String>) -> Vec<String> {
    uids.sort();
    uids
}

#[tokio::test]
async fn an_unknown_track_answers_zeros() {
    let server = Server::start().await;
    assert_eq!(counts(&server, "nobody/here").await, (0, 0));
    let (status, body) = track_get(&server, "nobody/here", "/listeners").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"listeners": []})));
    let (status, body) = track_get(&server, "nobody/here", "/messages").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"messages": []})));
}

#[tokio::test]
async fn online_is_exact_on_one_node() {
    let server = Server::start_args(&["--presence-grace", "100ms"]).await;
    let track = "rooms/42";
    let uids: Vec<String> = (0..3).map(|_| uid("present")).collect();
    for uid in &uids {
        server.connect(uid, track).await;
    }
    server.connect(&uids[0], ":other").await;
    assert_eq!(counts(&server, track).await, (3, 0));
    // Once a stream's headers arrive it is registered: no wait.
    let first = server.listen(&uids[0]).await;
    let second = server.listen(&uids[0]).await;
    let third = server.listen(&uids[1]).await;
    assert_eq!(counts(&server, track).await, (3, 2));
    assert_eq!(counts(&server, ":other").await, (1, 1));
    let (status, body) = server.listener(&uids[0]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["online"], 2, "two streams open");
    drop(first);
    // One of its two streams is still open: still online.
    eventually("the first stream to close", WAIT, || async {
        let (_, body) = server.listener(&uids[0]).await;
        (body["online"] == 1).then_some(())
    })
    .await;
    assert_eq!(counts(&server, track).await, (3, 2));
    drop((second, third));
    eventually("both listeners offline", WAIT, || async {
        (counts(&server, track).await == (3, 0)).then_some(())
    })
    .await;
    let (listed, _) = all_listeners(&server, track, "", 100).await;
    assert!(listed.iter().all(|(_, online)| !online), "{listed:?}");
}

#[tokio::test]
async fn listeners_come_in_uid_order_page_by_page_filtered_by_online() {
    let server = Server::start().await;
    let track = "rooms/pages";
    let uids: Vec<String> = (0..7).map(|_| uid("paged")).collect();
    // Connected out of order; listed in uid order.
    for uid in uids.iter().rev() {
        server.connect(uid, track).await;
    }
    let online = [&uids[1], &uids[4], &uids[5]];
    let mut streams = Vec::new();
    for uid in online {
        streams.push(server.listen(uid).await);
    }
    let (everyone, pages) = all_listeners(&server, track, "", 3).await;
    assert_eq!(pages, 3, "7 listeners in pages of 3");
    let listed: Vec<String> = everyone.iter().map(|(u, _)| u.clone()).collect();
    assert_eq!(listed, sorted(uids.clone()));
    for (uid, is_online) in &everyone {
        assert_eq!(*is_online, online.contains(&uid), "{uid}");
    }
    let (on, _) = all_listeners(&server, track, "&online=true", 2).await;
    let on: Vec<String> = on.into_iter().map(|(u, _)| u).collect();
    assert_eq!(on, sorted(online.iter().map(|u| (*u).clone()).collect()));
    let (off, _) = all_listeners(&server, track, "&online=false", 100).await;
    assert_eq!(off.len(), 4);
    assert!(off.iter().all(|(_, online)| !online));
    // Exactly one page: no `next`.
    let (status, body) = track_get(&server, track, "/listeners?limit=7").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["listeners"].as_array().map(Vec::len), Some(7));
    assert!(body.get("next").is_none(), "{body}");
    drop(streams);
}

/// The ids and messages of a `…/messages` answer.
fn history(body: &Value) -> Vec<(u64, Value)> {
    body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (common::id_of(&m["id"]), m["message"].clone()))
        .collect()
}

#[tokio::test]
async fn history_pages_through_what_is_kept_and_says_reset_when_after_is_older() {
    let server = Server::start_args(&["--max-stored-messages", "6"]).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let pair = server
            .publish_batch(&[("rooms/h", json!({"n": i})), (":noise", json!(i))])
            .await;
        ids.push(pair[0]);
    }
    // Ten messages, six kept: rooms/h keeps its last three.
    let kept: Vec<(u64, Value)> = ids[2..]
        .iter()
        .zip(2..)
        .map(|(&id, i)| (id, json!({"n": i})))
        .collect();
    let (status, body) = track_get(&server, "rooms/h", "/messages").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history(&body), kept);
    assert!(body["messages"][0]["track"] == "rooms/h");
    assert!(body.get("reset").is_none(), "no after, no reset: {body}");
    let (_, body) = track_get(&server, "rooms/h", "/messages?after=0").await;
    assert_eq!(body["reset"], true, "after 0: the first messages are gone");
    assert_eq!(history(&body), kept);
    // Positions 1 to 4 are gone: `after` 4 lost nothing. (The rule is the log's, like a
    // stream's: after 3, position 4 is gone — of another track, but the log does not
    // keep which — so 3 is a reset.)
    let (_, body) = track_get(&server, "rooms/h", "/messages?after=4").await;
    assert!(body.get("reset").is_none(), "nothing lost after 4: {body}");
    assert_eq!(history(&body), kept);
    let (_, body) = track_get(&server, "rooms/h", "/messages?after=3").await;
    assert_eq!(body["reset"], true);
    let (_, body) = track_get(&server, "rooms/h", "/messages?after=999").await;
    assert_eq!(body["reset"], true, "an id this log never had");
    // Page by page.
    let (_, body) = track_get(&server, "rooms/h", "/messages?limit=2").await;
    assert_eq!(history(&body), kept[..2]);
    let next = body["next"].as_str().expect("next").to_owned();
    assert_eq!(next, kept[1].0.to_string());
    let (_, body) = track_get(
        &server,
        "rooms/h",
        &format!("/messages?limit=2&after={next}"),
    )
    .await;
    assert_eq!(history(&body), kept[2..]);
    assert!(body.get("next").is_none(), "{body}");
}

#[tokio::test]
async fn bad_names_and_parameters_answer_400() {
    let server = Server::start().await;
    let long = "x".repeat(257);
    for (path, code) in [
        ("/api/v1/tracks/bad%20track".to_owned(), "bad_track"),
        (format!("/api/v1/tracks/{long}"), "bad_track"),
        ("/api/v1/tracks/%FF".to_owned(), "bad_track"),
        ("/api/v1/tracks/t%09x/listeners".to_owned(), "bad_track"),
        ("/api/v1/tracks/t/listeners?limit=0".to_owned(), "bad_limit"),
        (
            "/api/v1/tracks/t/listeners?limit=1001".to_owned(),
            "bad_limit",
        ),
        (
            "/api/v1/tracks/t/messages?limit=ten".to_owned(),
            "bad_limit",
        ),
        (
            "/api/v1/tracks/t/listeners?after=short".to_owned(),
            "bad_uid",
        ),
        (
            "/api/v1/tracks/t/listeners?online=maybe".to_owned(),
            "bad_request",
        ),
        (
            "/api/v1/tracks/t/listeners?limt=5".to_owned(),
            "bad_request",
        ),
        (
            "/api/v1/tracks/t/messages?after=-1".to_owned(),
            "bad_event_id",
        ),
        (
            "/api/v1/tracks/t/messages?after=abc".to_owned(),
            "bad_event_id",
        ),
        (
            "/api/v1/tracks/t/messages?after=1&after=2".to_owned(),
            "bad_request",
        ),
    ] {
        let answer = server.get(&path).await;
        assert_error(&answer, 400, code);
    }
    // Without the key: like every backend call.
    let response = server
        .client()
        .get(format!("{}/api/v1/tracks/t", server.url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------------
// Three nodes on Redis
// ---------------------------------------------------------------------------------

fn shared_redis() -> String {
    std::env::var("DOLORES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("dolores-presence-{test}-{}-{nanos}", std::process::id())
}

async fn three_nodes(test: &str) -> [Server; 3] {
    let (redis, prefix) = (shared_redis(), prefix(test));
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            Server::config()
                .args(["--redis", &redis, "--redis-prefix", &prefix])
                .args(["--presence-grace", "200ms"])
                .start()
                .await,
        );
    }
    nodes.try_into().unwrap_or_else(|_| panic!("three nodes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_agree_on_who_is_online_and_a_killed_nodes_listeners_go_offline() {
    let mut nodes = three_nodes("online").await;
    let track = "rooms/cluster";
    let uids: Vec<String> = (0..3).map(|_| uid("cluster")).collect();
    for uid in &uids {
        nodes[0].connect(uid, track).await;
    }
    // One listener on each node.
    let mut streams = Vec::new();
    for (node, uid) in nodes.iter().zip(&uids) {
        streams.push(node.listen(uid).await);
    }
    let opened = Instant::now();
    for node in &nodes {
        eventually("every node to see three online", CLUSTER_BOUND, || async {
            (counts(node, track).await == (3, 3)).then_some(())
        })
        .await;
    }
    assert!(opened.elapsed() < CLUSTER_BOUND);
    let (listed, _) = all_listeners(&nodes[1], track, "&online=true", 2).await;
    assert_eq!(listed.len(), 3, "{listed:?}");

    // kill -9: the node cannot say goodbye; its key expires.
    nodes[2].kill9().await;
    let killed = Instant::now();
    for node in &nodes[..2] {
        eventually(
            "the killed node's listener offline",
            CLUSTER_BOUND,
            || async { (counts(node, track).await == (3, 2)).then_some(()) },
        )
        .await;
    }
    let took = killed.elapsed();
    assert!(took < CLUSTER_BOUND, "offline after {took:?}");
    let (listed, _) = all_listeners(&nodes[0], track, "", 100).await;
    let offline: Vec<&String> = listed
        .iter()
        .filter(|(_, on)| !on)
        .map(|(u, _)| u)
        .collect();
    assert_eq!(offline, [&uids[2]]);

    // A clean close is seen at once, not after the expiry.
    drop(streams.remove(0));
    eventually(
        "a closed stream's listener offline",
        CLUSTER_BOUND,
        || async { (counts(&nodes[1], track).await == (3, 1)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_history_read_the_track_indexes_on_any_node() {
    let nodes = three_nodes("replay").await;
    let listener = uid("replayer");
    nodes[0].connect(&listener, "rooms/a").await;
    nodes[0].connect(&listener, "rooms/b").await;
    let mut mine = Vec::new();
    for i in 0..60 {
        let track = match i % 20 {
            0 => "rooms/a",
            10 => "rooms/b",
            _ => "rooms/noise",
        };
        let id = nodes[i % 3].publish(track, json!(i)).await;
        if track != "rooms/noise" {
            mine.push(id);
        }
    }
    // A listener that resumes on another node gets its tracks only, in order.
    let mut stream = Sse::open(&nodes[1].listen_url(&listener, "?last_event_id=0"), None)
        .await
        .expect("open");
    let got: Vec<u64> = stream
        .events(mine.len())
        .await
        .iter()
        .map(common::Event::pos)
        .collect();
    assert_eq!(got, mine);
    // And the history of one track, from a third node.
    let (status, body) = track_get(&nodes[2], "rooms/b", "/messages").await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<u64> = history(&body).into_iter().map(|(id, _)| id).collect();
    let b: Vec<u64> = mine.iter().copied().skip(1).step_by(2).collect();
    assert_eq!(ids, b);
}
