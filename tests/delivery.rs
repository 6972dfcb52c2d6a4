//! Publish → receive over SSE against the real binary: live delivery, the queue kept
//! between `connect` and the stream opening, several streams of one listener, and
//! what `disconnect` does to open streams.

mod common;

use std::time::Duration;

use common::{Server, Sse, assert_error, positions, uid};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_starts_with_retry_and_sends_sse_headers() {
    let server = Server::start().await;
    let u = uid("headers");
    server.connect(&u, ":data").await;
    let mut sse = server.listen(&u).await;
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert_eq!(sse.headers["cache-control"], "no-cache");
    assert_eq!(sse.headers["x-accel-buffering"], "no");
    let first = sse.next_block().await;
    assert_eq!(first.retry.as_deref(), Some("2000"), "{first:?}");
    assert!(first.data.is_none(), "{first:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_message_reaches_open_stream() {
    let server = Server::start().await;
    let u = uid("live");
    server.connect(&u, ":data").await;
    let mut sse = server.listen(&u).await;
    let id = server.publish(":data", json!("hello")).await;
    let event = sse.next_event().await;
    assert_eq!(event.kind, "message");
    assert_eq!(event.pos(), id);
    assert_eq!(event.data, json!({"track": ":data", "message": "hello"}));

    // Any JSON value goes through as it was sent.
    let message = json!({"n": 1, "list": [1, "two", null, true], "text": "a\nb \"q\" é"});
    let id2 = server.publish(":data", message.clone()).await;
    let event = sse.next_event().await;
    assert_eq!(event.pos(), id2);
    assert!(id2 > id);
    assert_eq!(event.message(), &message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_publish_then_open_delivers_the_queue_then_live() {
    let server = Server::start().await;
    let u = uid("queue");
    server.connect(&u, ":data").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(server.publish(":data", json!(i)).await);
    }
    let mut sse = server.listen(&u).await;
    let events = sse.events(5).await;
    assert_eq!(positions(&events), ids);
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.message(), &json!(i));
    }
    let live = server.publish(":data", json!("live")).await;
    let event = sse.next_event().await;
    assert_eq!(event.pos(), live);
    sse.assert_no_event(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_before_connect_and_of_other_tracks_are_not_delivered() {
    let server = Server::start().await;
    let u = uid("before");
    server.publish(":data", json!("too early")).await;
    server.connect(&u, ":data").await;
    server.publish(":other", json!("other track")).await;
    let mine = server.publish(":data", json!("mine")).await;
    let mut sse = server.listen(&u).await;
    let event = sse.next_event().await;
    assert_eq!(event.pos(), mine);
    assert_eq!(event.message(), &json!("mine"));
    sse.assert_no_event(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_of_several_tracks_gets_them_merged_in_publish_order() {
    let server = Server::start().await;
    let u = uid("merge");
    server.connect(&u, ":a").await;
    let tracks = server.connect(&u, "rooms/42;x").await;
    assert_eq!(tracks, vec![":a", "rooms/42;x"]);
    let mut expected = Vec::new();
    for i in 0..10 {
        let track = if i % 3 == 0 { "rooms/42;x" } else { ":a" };
        expected.push((server.publish(track, json!(i)).await, track));
    }
    let mut sse = server.listen(&u).await;
    let events = sse.events(10).await;
    let got: Vec<(u64, &str)> = events.iter().map(|e| (e.pos(), e.track())).collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_cursor_resumes_where_the_last_one_stopped() {
    let server = Server::start().await;
    let u = uid("cursor");
    server.connect(&u, ":data").await;
    let first: Vec<u64> = {
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(server.publish(":data", json!(i)).await);
        }
        ids
    };
    {
        let mut sse = server.listen(&u).await;
        assert_eq!(positions(&sse.events(3).await), first);
    }
    let mut later = Vec::new();
    for i in 3..5 {
        later.push(server.publish(":data", json!(i)).await);
    }
    let mut sse = server.listen(&u).await;
    assert_eq!(positions(&sse.events(2).await), later);
    sse.assert_no_event(Duration::from_millis(300)).await;
    let (status, body) = server.listener(&u).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["last_event_id"], later[1].to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_an_open_stream_to_a_new_track_delivers_it_live() {
    let server = Server::start().await;
    let u = uid("addtrack");
    server.connect(&u, ":a").await;
    let mut sse = server.listen(&u).await;
    server.connect(&u, ":b").await;
    let id = server.publish(":b", json!("b")).await;
    let event = sse.next_event().await;
    assert_eq!((event.pos(), event.track()), (id, ":b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_idempotent() {
    let server = Server::start().await;
    let u = uid("idem");
    assert_eq!(server.connect(&u, ":a").await, vec![":a"]);
    assert_eq!(server.connect(&u, ":a").await, vec![":a"]);
    let id = server.publish(":a", json!(1)).await;
    let mut sse = server.listen(&u).await;
    assert_eq!(sse.next_event().await.pos(), id);
    sse.assert_no_event(Duration::from_millis(300)).await;
    let stats = server.stats().await;
    assert_eq!(stats["listeners"], 1, "{stats}");
    assert_eq!(stats["tracks"], 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_streams_of_one_listener_all_receive_and_count_as_online() {
    let server = Server::start().await;
    let u = uid("multi");
    server.connect(&u, ":data").await;
    let (_, body) = server.listener(&u).await;
    assert_eq!(body["online"], 0, "{body}");
    assert_eq!(body["uid"], u.as_str());
    assert_eq!(body["tracks"], json!([":data"]));
    assert!(
        body["last_seen"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{body}"
    );

    let mut one = server.listen(&u).await;
    let mut two = server.listen(&u).await;
    let (_, body) = server.listener(&u).await;
    assert_eq!(body["online"], 2, "{body}");
    let id = server.publish(":data", json!("both")).await;
    assert_eq!(one.next_event().await.pos(), id);
    assert_eq!(two.next_event().await.pos(), id);
    let stats = server.stats().await;
    assert_eq!(stats["streams"]["sse"], 2, "{stats}");

    drop(two);
    common::eventually("online to drop to 1", common::WAIT, || async {
        let (_, body) = server.listener(&u).await;
        (body["online"] == 1).then_some(())
    })
    .await;
    let id = server.publish(":data", json!("one")).await;
    assert_eq!(one.next_event().await.pos(), id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_without_track_ends_open_streams_and_forgets_the_listener() {
    let server = Server::start().await;
    let u = uid("forget");
    server.connect(&u, ":data").await;
    let mut one = server.listen(&u).await;
    let mut two = server.listen(&u).await;
    let (status, body) = server.api("disconnect", json!({"uid": u})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"uid": u, "tracks": []}));
    for sse in [&mut one, &mut two] {
        let (blocks, end) = sse.end_within(common::WAIT).await;
        assert!(end.is_ok(), "a clean end: {end:?}");
        assert!(blocks.iter().all(|b| b.data.is_none()), "{blocks:?}");
    }
    assert_error(&server.listener(&u).await, 404, "unknown_listener");
    let refused = Sse::open(&server.listen_url(&u, ""), None)
        .await
        .expect_err("a forgotten listener");
    assert_error(&refused.answer(), 404, "unknown_listener");
    let again = server.api("disconnect", json!({"uid": u})).await;
    assert_error(&again, 404, "unknown_listener");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_from_one_track_stops_only_that_track() {
    let server = Server::start().await;
    let u = uid("onetrack");
    server.connect(&u, ":a").await;
    server.connect(&u, ":b").await;
    let mut sse = server.listen(&u).await;
    let (status, body) = server
        .api("disconnect", json!({"uid": u, "track": ":a"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tracks"], json!([":b"]));
    server.publish(":a", json!("gone")).await;
    let b = server.publish(":b", json!("kept")).await;
    let event = sse.next_event().await;
    assert_eq!((event.pos(), event.track()), (b, ":b"));
    sse.assert_no_event(Duration::from_millis(300)).await;
    // Leaving a track it does not have changes nothing.
    let (status, body) = server
        .api("disconnect", json!({"uid": u, "track": ":zzz"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tracks"], json!([":b"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_listener_is_a_404_everywhere() {
    let server = Server::start().await;
    let u = uid("nobody");
    assert_error(&server.listener(&u).await, 404, "unknown_listener");
    let refused = Sse::open(&server.listen_url(&u, ""), None)
        .await
        .expect_err("unknown listener");
    assert_error(&refused.answer(), 404, "unknown_listener");
    assert_error(
        &server
            .api("disconnect", json!({"uid": u, "track": ":data"}))
            .await,
        404,
        "unknown_listener",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_an_idle_stream_alive() {
    let server = Server::start_args(&["--heartbeat", "200ms"]).await;
    let u = uid("beat");
    server.connect(&u, ":data").await;
    let mut sse = server.listen(&u).await;
    let mut heartbeats = 0;
    while heartbeats < 3 {
        let block = sse
            .next_block_within(Duration::from_secs(5))
            .await
            .expect("open");
        assert!(block.data.is_none(), "no event was published: {block:?}");
        if block.comments.iter().any(|c| c == "heartbeat") {
            heartbeats += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_engine_delivers_the_same_way() {
    let server = Server::config().memory().start().await;
    let u = uid("memory");
    server.connect(&u, ":data").await;
    let queued = server.publish(":data", json!("queued")).await;
    let mut sse = server.listen(&u).await;
    assert_eq!(sse.next_event().await.pos(), queued);
    let live = server.publish(":data", json!("live")).await;
    assert_eq!(sse.next_event().await.pos(), live);
    let stats = server.stats().await;
    assert_eq!(stats["engine"], "memory");
    assert_eq!(stats["messages_stored"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_update_is_delivered_in_order() {
    let server = Server::start().await;
    let u = uid("batch");
    server.connect(&u, ":a").await;
    server.connect(&u, ":b").await;
    let mut sse = server.listen(&u).await;
    let ids = server
        .publish_batch(&[
            (":a", json!(1)),
            (":b", json!(2)),
            (":c", json!(3)),
            (":a", json!(4)),
        ])
        .await;
    assert_eq!(ids.len(), 4);
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    let events = sse.events(3).await;
    assert_eq!(positions(&events), vec![ids[0], ids[1], ids[3]]);
    assert_eq!(events[2].message(), &json!(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_answer() {
    let server = Server::start().await;
    let client = reqwest::Client::new();
    let health = client
        .get(format!("{}/healthz", server.url()))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);
    let u = uid("metrics");
    server.connect(&u, ":data").await;
    let _sse = server.listen(&u).await;
    server.publish(":data", json!(1)).await;
    let metrics = client
        .get(format!("{}/metrics", server.url()))
        .send()
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.expect("text");
    assert!(text.contains("dolores_messages_published"), "{text}");
    assert!(
        text.contains("dolores_messages_published_total 1"),
        "{text}"
    );
    assert!(
        text.contains("dolores_connections{transport=\"sse\"} 1"),
        "{text}"
    );
}
