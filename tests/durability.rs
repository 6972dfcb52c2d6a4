//! The durable store's promise: a `200` from `update` or `connect` survives `kill -9`
//! of the server and a restart on the same data dir.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Server, Sse, positions, uid};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// Every acknowledged message: id → (track, message, whether it was sent after the
/// late listener was connected).
type Acked = Arc<Mutex<BTreeMap<u64, (String, Value, bool)>>>;

/// Set once the late listener's `connect` has answered.
static LATE_CONNECTED: AtomicBool = AtomicBool::new(false);

/// Publishes to `tracks` in a loop (singles and small batches) until the server stops
/// answering; records every acknowledged message.
async fn publish_until_refused(
    url: String,
    key: String,
    p: usize,
    tracks: Vec<String>,
    acked: Acked,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    for i in 0..100_000usize {
        let track = &tracks[i % tracks.len()];
        let batch = i % 7 == 3;
        let body = if batch {
            json!({"updates": [
                {"track": track, "message": {"p": p, "i": i, "part": 0}},
                {"track": track, "message": {"p": p, "i": i, "part": 1}},
                {"track": track, "message": {"p": p, "i": i, "part": 2}},
            ]})
        } else {
            json!({"track": track, "message": {"p": p, "i": i}})
        };
        let after_late = LATE_CONNECTED.load(Ordering::SeqCst);
        let sent = client
            .post(format!("{url}/api/v1/update"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await;
        let Ok(response) = sent else { return };
        if response.status() != StatusCode::OK {
            return;
        }
        let Ok(answer) = response.json::<Value>().await else {
            return;
        };
        let mut acked = acked.lock().await;
        if batch {
            for (part, id) in answer["ids"].as_array().expect("ids").iter().enumerate() {
                let message = json!({"p": p, "i": i, "part": part});
                acked.insert(common::id_of(id), (track.clone(), message, after_late));
            }
        } else {
            let message = body["message"].clone();
            acked.insert(
                common::id_of(&answer["id"]),
                (track.clone(), message, after_late),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_and_restart_keeps_every_acknowledged_message_and_subscription() {
    let mut server = Server::spawn().await;
    let (early, late) = (uid("early"), uid("late"));
    server.connect(&early, ":a").await;
    server.connect(&early, ":b").await;
    let acked: Acked = Arc::default();

    // Four publishers go on publishing; halfway a second listener is connected.
    let tracks = vec![":a".to_owned(), ":b".to_owned(), ":c".to_owned()];
    let mut publishers = Vec::new();
    for p in 0..4 {
        publishers.push(tokio::spawn(publish_until_refused(
            server.url(),
            server.api_key().to_owned(),
            p,
            tracks.clone(),
            acked.clone(),
        )));
    }
    common::eventually("150 acknowledged messages", common::WAIT, || async {
        (acked.lock().await.len() >= 150).then_some(())
    })
    .await;
    server.connect(&late, ":c").await;
    LATE_CONNECTED.store(true, Ordering::SeqCst);
    common::eventually("1,000 acknowledged messages", common::WAIT, || async {
        (acked.lock().await.len() >= 1000).then_some(())
    })
    .await;

    // Kill -9 while the publishers are still going.
    server.kill9().await;
    for publisher in publishers {
        common::within("the publishers to notice", common::WAIT, publisher)
            .await
            .expect("publisher");
    }
    let acked = acked.lock().await.clone();
    let max_acked = *acked.keys().last().expect("acked");

    server.restart().await;
    let (status, body) = server.listener(&early).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tracks"], json!([":a", ":b"]));
    let (status, body) = server.listener(&late).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tracks"], json!([":c"]));

    // Everything acknowledged on the listener's tracks comes, once, in order.
    // (Messages the server stored but could not acknowledge before it died may come too.)
    for (u, tracks, only_late) in [(&early, [":a", ":b"], false), (&late, [":c", ":c"], true)] {
        let expected: Vec<u64> = acked
            .iter()
            .filter(|(_, (track, _, late))| {
                tracks.contains(&track.as_str()) && (*late || !only_late)
            })
            .map(|(id, _)| *id)
            .collect();
        let mut sse = Sse::open(&server.listen_url(u, "?last_event_id=0"), None)
            .await
            .expect("open");
        let mut got = Vec::new();
        let last_expected = *expected.last().expect("some acknowledged");
        while got.last().is_none_or(|last| *last < last_expected) {
            // Nothing for a while: the rest was lost (reported below).
            let Some(event) = sse.try_next_event(Duration::from_secs(3)).await else {
                break;
            };
            assert!(!event.is_reset(), "{event:?}");
            assert!(tracks.contains(&event.track()), "{event:?}");
            if let Some((track, message, _)) = acked.get(&event.pos()) {
                assert_eq!((track.as_str(), message), (event.track(), event.message()));
            }
            if let Some(last) = got.last() {
                assert!(
                    event.pos() > *last,
                    "in order, no duplicate: {event:?} after {last}"
                );
            }
            got.push(event.pos());
        }
        let missing: Vec<u64> = expected
            .iter()
            .filter(|id| !got.contains(id))
            .copied()
            .collect();
        assert!(
            missing.is_empty(),
            "{u}: acknowledged but lost: {missing:?}"
        );
    }

    // The whole log, track by track: every position from 1 to the head once, with
    // every acknowledged message at its own (the log has no hole and no duplicate).
    let mut stored = BTreeMap::new();
    for track in &tracks {
        let mut after = 0;
        loop {
            let (status, page) = server
                .get(&format!(
                    "/api/v1/tracks/{track}/messages?after={after}&limit=1000"
                ))
                .await;
            assert_eq!(status, StatusCode::OK, "{page}");
            for message in page["messages"].as_array().expect("messages") {
                let id = common::id_of(&message["id"]);
                let again = stored.insert(id, (track.clone(), message["message"].clone()));
                assert!(again.is_none(), "position {id} stored twice");
            }
            match page.get("next") {
                Some(next) => after = common::id_of(next),
                None => break,
            }
        }
    }
    let head = *stored.keys().last().expect("stored");
    assert_eq!(
        stored.keys().copied().collect::<Vec<u64>>(),
        (1..=head).collect::<Vec<u64>>(),
        "no hole in the log"
    );
    for (id, (track, message, _)) in &acked {
        assert_eq!(
            stored.get(id),
            Some(&(track.clone(), message.clone())),
            "{id}"
        );
    }

    // Ids go on from where they were: never reused after the restart.
    let next = server.publish(":a", json!("after restart")).await;
    assert!(
        next > max_acked && next > head,
        "{next} after {max_acked}, {head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_resumes_on_the_restarted_server_without_loss() {
    let mut server = Server::spawn().await;
    let u = uid("reopen");
    server.connect(&u, ":data").await;
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(server.publish(":data", json!(i)).await);
    }
    let mut sse = server.listen(&u).await;
    let before = sse.events(12).await;
    server.kill9().await;
    let (_, end) = sse.end_within(common::WAIT).await;
    assert!(
        end.is_err(),
        "a killed server cannot end the stream cleanly"
    );
    server.restart().await;
    for i in 20..25 {
        acked.push(server.publish(":data", json!(i)).await);
    }
    let last = before.last().expect("events").id.clone();
    let mut sse = Sse::open(&server.listen_url(&u, ""), Some(&last))
        .await
        .expect("open");
    let after = sse.events(acked.len() - before.len()).await;
    let mut all = positions(&before);
    all.extend(positions(&after));
    assert_eq!(all, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_messages_subscriptions_and_the_delivery_cursor() {
    let mut server = Server::spawn().await;
    let u = uid("graceful");
    server.connect(&u, ":data").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(server.publish(":data", json!(i)).await);
    }
    {
        let mut sse = server.listen(&u).await;
        assert_eq!(positions(&sse.events(3).await), ids);
    }
    for i in 3..5 {
        ids.push(server.publish(":data", json!(i)).await);
    }
    // The cursor is written lazily; a graceful shutdown must flush it.
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
    server.restart().await;
    let (_, body) = server.listener(&u).await;
    assert_eq!(body["tracks"], json!([":data"]));
    assert_eq!(body["last_event_id"], ids[2].to_string(), "{body}");
    let mut sse = server.listen(&u).await;
    assert_eq!(positions(&sse.events(2).await), ids[3..]);
    sse.assert_no_event(Duration::from_millis(300)).await;
    let stats = server.stats().await;
    assert_eq!(stats["messages_stored"], 5, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_engine_forgets_everything_on_restart() {
    let mut server = Server::config().memory().start().await;
    let u = uid("mem");
    server.connect(&u, ":data").await;
    server.publish(":data", json!(1)).await;
    server.stop().await;
    server.restart().await;
    common::assert_error(&server.listener(&u).await, 404, "unknown_listener");
    assert_eq!(server.stats().await["messages_stored"], 0);
}
