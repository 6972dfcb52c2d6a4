//! The `reset` event: a cursor older than what the store keeps (by count or by age)
//! gets one reset first, then only live messages.

mod common;

use std::time::Duration;

use common::{Server, Sse, positions, uid};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_max_stored_messages_gets_one_reset_then_live() {
    let server = Server::start_args(&["--max-stored-messages", "5"]).await;
    let (with_zero, with_own) = (uid("zero"), uid("own"));
    server.connect(&with_zero, ":data").await;
    server.connect(&with_own, ":data").await;
    let mut head = 0;
    for i in 0..20 {
        head = server.publish(":data", json!(i)).await;
    }
    assert_eq!(server.stats().await["messages_stored"], 5);

    // One asks from 0; the other has its own cursor (it was never delivered to).
    for (u, query) in [(&with_zero, "?last_event_id=0"), (&with_own, "")] {
        let mut sse = Sse::open(&server.listen_url(u, query), None)
            .await
            .expect("open");
        let reset = sse.next_event().await;
        assert!(reset.is_reset(), "{reset:?}");
        assert_eq!(reset.data, json!({"reset": true}));
        assert_eq!(reset.pos(), head, "the reset carries the id to resume from");
        let live = server.publish(":data", json!("live")).await;
        let event = sse.next_event().await;
        assert!(!event.is_reset());
        assert_eq!(event.pos(), live, "only live messages after the reset");
        head = live;
        sse.assert_no_event(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_the_reset_id_replays_nothing_and_needs_no_reset() {
    let server = Server::start_args(&["--max-stored-messages", "5"]).await;
    let u = uid("after-reset");
    server.connect(&u, ":data").await;
    for i in 0..20 {
        server.publish(":data", json!(i)).await;
    }
    let reset_id = {
        let mut sse = Sse::open(&server.listen_url(&u, "?last_event_id=0"), None)
            .await
            .expect("open");
        let reset = sse.next_event().await;
        assert!(reset.is_reset());
        reset.id
    };
    let next = server.publish(":data", json!("next")).await;
    let mut sse = Sse::open(&server.listen_url(&u, ""), Some(&reset_id))
        .await
        .expect("open");
    let event = sse.next_event().await;
    assert!(!event.is_reset(), "{event:?}");
    assert_eq!(event.pos(), next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_at_the_edge_of_what_is_kept_gets_the_rest_without_reset() {
    let server = Server::start_args(&["--max-stored-messages", "5"]).await;
    let u = uid("edge");
    server.connect(&u, ":data").await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(server.publish(":data", json!(i)).await);
    }
    // The last 5 are kept: a client that had everything before them loses nothing.
    let edge = ids[14].to_string();
    let mut sse = Sse::open(&server.listen_url(&u, ""), Some(&edge))
        .await
        .expect("open");
    let events = sse.events(5).await;
    assert!(events.iter().all(|e| !e.is_reset()), "{events:?}");
    assert_eq!(positions(&events), ids[15..]);

    // One further back has lost a message: reset.
    let older = ids[13].to_string();
    let mut sse = Sse::open(&server.listen_url(&u, ""), Some(&older))
        .await
        .expect("open");
    assert!(sse.next_event().await.is_reset());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_beyond_the_head_gets_a_reset() {
    // Like a client coming back with an id from another (or a wiped) store.
    let server = Server::start().await;
    let u = uid("future");
    server.connect(&u, ":data").await;
    let head = server.publish(":data", json!(1)).await;
    let mut sse = Sse::open(&server.listen_url(&u, ""), Some("999999"))
        .await
        .expect("open");
    let reset = sse.next_event().await;
    assert!(reset.is_reset(), "{reset:?}");
    assert_eq!(reset.pos(), head);
    let live = server.publish(":data", json!(2)).await;
    assert_eq!(sse.next_event().await.pos(), live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_within_the_limit_gets_no_reset() {
    let server = Server::start_args(&["--max-stored-messages", "5"]).await;
    let u = uid("within");
    server.connect(&u, ":data").await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(server.publish(":data", json!(i)).await);
    }
    let mut sse = server.listen(&u).await;
    let events = sse.events(4).await;
    assert_eq!(positions(&events), ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_older_than_retention_are_dropped_and_their_cursor_gets_a_reset() {
    let server = Server::start_args(&["--retention", "1s"]).await;
    let u = uid("age");
    server.connect(&u, ":data").await;
    let mut head = 0;
    for i in 0..5 {
        head = server.publish(":data", json!(i)).await;
    }
    common::eventually(
        "retention to delete the old messages",
        common::WAIT,
        || async { (server.stats().await["messages_stored"] == 0).then_some(()) },
    )
    .await;
    let mut sse = server.listen(&u).await;
    let reset = sse.next_event().await;
    assert!(reset.is_reset(), "{reset:?}");
    assert_eq!(reset.pos(), head);
    let live = server.publish(":data", json!("live")).await;
    let event = sse.next_event().await;
    assert_eq!(event.pos(), live);
    assert_eq!(event.message(), &json!("live"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_not_seen_for_listener_ttl_is_forgotten_but_an_open_one_is_kept() {
    let server = Server::start_args(&["--listener-ttl", "1s", "--heartbeat", "200ms"]).await;
    let (away, here) = (uid("away"), uid("here"));
    server.connect(&away, ":data").await;
    server.connect(&here, ":data").await;
    let mut sse = server.listen(&here).await;
    common::eventually(
        "the away listener to be forgotten",
        common::WAIT,
        || async { (server.listener(&away).await.0 == StatusCode::NOT_FOUND).then_some(()) },
    )
    .await;
    // Well past the ttl, the listener with an open stream is still there and served.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = server.listener(&here).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["online"], 1);
    let id = server.publish(":data", json!("still here")).await;
    assert_eq!(sse.next_event().await.pos(), id);
}
