//! Resuming a stream with the client's own cursor — the `Last-Event-ID` header or the
//! `last_event_id` query parameter — with no duplicate and no gap, while publishers go
//! on publishing.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Server, Sse, assert_error, positions, uid};
use serde_json::{Value, json};

/// How the client names its cursor on a reconnect.
#[derive(Debug, Clone, Copy)]
enum Cursor {
    Header,
    Query,
    /// Alternate between the two.
    Both,
}

/// Publishes `per_publisher` messages from each of `publishers` concurrent tasks to
/// `track`, with a short pause now and then; returns every acknowledged id and its message.
fn spawn_publishers(
    server: &Arc<Server>,
    track: &'static str,
    publishers: usize,
    per_publisher: usize,
) -> tokio::task::JoinHandle<BTreeMap<u64, Value>> {
    let server = server.clone();
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for p in 0..publishers {
            let server = server.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..per_publisher {
                    let message = json!({"p": p, "i": i});
                    let id = server.publish(track, message.clone()).await;
                    acked.push((id, message));
                    if i % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                acked
            }));
        }
        let mut all = BTreeMap::new();
        for task in tasks {
            for (id, message) in task.await.expect("publisher") {
                assert!(all.insert(id, message).is_none(), "id {id} given twice");
            }
        }
        all
    })
}

/// Reads the listener's messages over many short-lived streams, each resumed from the
/// last id received, until `expected_total` arrived (at most a bound of rounds).
async fn read_with_reconnects(
    server: &Server,
    uid: &str,
    how: Cursor,
    published: &tokio::task::JoinHandle<BTreeMap<u64, Value>>,
    total: usize,
) -> Vec<common::Event> {
    let mut received: Vec<common::Event> = Vec::new();
    let mut round = 0usize;
    while received.len() < total {
        round += 1;
        assert!(
            round < 500,
            "too many rounds; got {} of {total}",
            received.len()
        );
        let last = received.last().map(|e| e.id.clone());
        let header = matches!(how, Cursor::Header)
            || (matches!(how, Cursor::Both) && round.is_multiple_of(2));
        let mut sse = match (&last, header) {
            (None, _) => Sse::open(&server.listen_url(uid, ""), None).await,
            (Some(id), true) => Sse::open(&server.listen_url(uid, ""), Some(id)).await,
            (Some(id), false) => {
                Sse::open(
                    &server.listen_url(uid, &format!("?last_event_id={id}")),
                    None,
                )
                .await
            }
        }
        .expect("open");
        // Read a varying handful, then drop the connection mid-stream.
        let want = 5 + (round * 13) % 29;
        for _ in 0..want {
            if received.len() >= total {
                break;
            }
            let limit = if published.is_finished() {
                common::WAIT
            } else {
                Duration::from_secs(2)
            };
            match sse.try_next_event(limit).await {
                Some(event) => {
                    assert!(!event.is_reset(), "no reset expected: {event:?}");
                    received.push(event);
                }
                None if published.is_finished() => {
                    panic!("nothing more after {} of {total} events", received.len())
                }
                None => break,
            }
        }
    }
    received
}

async fn resume_without_duplicate_or_gap(how: Cursor) {
    let server = Arc::new(Server::start().await);
    let u = uid("resume");
    server.connect(&u, ":data").await;
    let (publishers, per_publisher) = (2, 150);
    let publishing = spawn_publishers(&server, ":data", publishers, per_publisher);
    let received =
        read_with_reconnects(&server, &u, how, &publishing, publishers * per_publisher).await;
    let acked = common::within("the publishers", common::WAIT, publishing)
        .await
        .expect("publishers");
    let ids = positions(&received);
    let expected: Vec<u64> = acked.keys().copied().collect();
    assert_eq!(ids, expected, "every acknowledged id once, in order");
    for event in &received {
        assert_eq!(event.track(), ":data");
        assert_eq!(Some(event.message()), acked.get(&event.pos()), "{event:?}");
    }
    // Nothing more after the last one.
    let last = received.last().expect("events").id.clone();
    let mut sse = Sse::open(&server.listen_url(&u, ""), Some(&last))
        .await
        .expect("open");
    sse.assert_no_event(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_last_event_id_header_has_no_duplicate_and_no_gap() {
    resume_without_duplicate_or_gap(Cursor::Header).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_last_event_id_query_has_no_duplicate_and_no_gap() {
    resume_without_duplicate_or_gap(Cursor::Query).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_alternating_header_and_query_has_no_duplicate_and_no_gap() {
    resume_without_duplicate_or_gap(Cursor::Both).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_wins_over_query() {
    let server = Server::start().await;
    let u = uid("wins");
    server.connect(&u, ":data").await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(server.publish(":data", json!(i)).await);
    }
    let url = server.listen_url(&u, &format!("?last_event_id={}", ids[1]));
    let mut sse = Sse::open(&url, Some(&ids[5].to_string()))
        .await
        .expect("open");
    assert_eq!(positions(&sse.events(4).await), ids[6..].to_vec());
    sse.assert_no_event(Duration::from_millis(300)).await;

    // The query alone counts too.
    let mut sse = Sse::open(&url, None).await.expect("open");
    assert_eq!(positions(&sse.events(8).await), ids[2..].to_vec());

    // A bad header is refused even beside a good query, since the header wins.
    let refused = Sse::open(&url, Some("not-a-number"))
        .await
        .expect_err("bad id");
    assert_error(&refused.answer(), 400, "bad_event_id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_cursor_means_no_cursor() {
    let server = Server::start().await;
    let u = uid("empty");
    server.connect(&u, ":data").await;
    let id = server.publish(":data", json!(1)).await;
    let mut sse = Sse::open(&server.listen_url(&u, "?last_event_id="), Some(""))
        .await
        .expect("open");
    assert_eq!(sse.next_event().await.pos(), id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_event_ids_are_refused() {
    let server = Server::start().await;
    let u = uid("badid");
    server.connect(&u, ":data").await;
    for bad in ["abc", "-1", "1.5", "18446744073709551616", "0x10"] {
        let refused = Sse::open(&server.listen_url(&u, ""), Some(bad))
            .await
            .expect_err(bad);
        assert_error(&refused.answer(), 400, "bad_event_id");
        let refused = Sse::open(
            &server.listen_url(&u, &format!("?last_event_id={bad}")),
            None,
        )
        .await
        .expect_err(bad);
        assert_error(&refused.answer(), 400, "bad_event_id");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_zero_gets_only_messages_since_connect() {
    let server = Server::start().await;
    let u = uid("zero");
    server.publish(":data", json!("before")).await;
    server.connect(&u, ":data").await;
    let after = server.publish(":data", json!("after")).await;
    let mut sse = Sse::open(&server.listen_url(&u, ""), Some("0"))
        .await
        .expect("open");
    let event = sse.next_event().await;
    assert!(!event.is_reset(), "{event:?}");
    assert_eq!(event.pos(), after);
    sse.assert_no_event(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_longer_than_a_page_on_several_tracks_is_complete_and_ordered() {
    let server = Server::start().await;
    let u = uid("pages");
    server.connect(&u, ":a").await;
    server.connect(&u, ":b").await;
    let mut expected = Vec::new();
    for round in 0..3 {
        let updates: Vec<(&str, Value)> = (0..500)
            .map(|i| {
                // Uneven: more of :a than of :b, and a track nobody listens to.
                let track = match i % 5 {
                    0..=2 => ":a",
                    3 => ":b",
                    _ => ":nobody",
                };
                (track, json!({"round": round, "i": i}))
            })
            .collect();
        let ids = server.publish_batch(&updates).await;
        expected.extend(
            ids.iter()
                .zip(&updates)
                .filter(|(_, (track, _))| *track != ":nobody")
                .map(|(id, _)| *id),
        );
    }
    let mut sse = Sse::open(&server.listen_url(&u, ""), Some("0"))
        .await
        .expect("open");
    let events = sse.events(expected.len()).await;
    assert_eq!(positions(&events), expected);
    sse.assert_no_event(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumes_on_the_same_data_dir_after_a_stop_and_a_start() {
    let mut server = Server::start().await;
    let u = uid("restarted");
    server.connect(&u, ":data").await;
    let before = server
        .publish_batch(&[(":data", json!(1)), (":data", json!(2))])
        .await;
    let mut sse = server.listen(&u).await;
    let got = sse.events(1).await;
    drop(sse);
    // A stop flushes the store and lets go of it, so the next start opens it again.
    server.stop().await;
    server.restart().await;
    let after = server.publish(":data", json!(3)).await;
    let mut sse = Sse::open(&server.listen_url(&u, ""), Some(&got[0].id))
        .await
        .expect("open after the restart");
    assert_eq!(positions(&sse.events(2).await), vec![before[1], after]);
}
