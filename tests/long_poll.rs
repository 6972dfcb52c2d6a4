//! `GET /poll/{uid}` over real sockets: answers at once when something is queued,
//! waits for live messages, answers empty after its timeout, acknowledges with the
//! next request's cursor, and loses nothing when a client vanishes mid-poll.

mod common;

use std::time::{Duration, Instant};

use common::{Server, WAIT, assert_error, uid, within};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

async fn poll(server: &Server, uid: &str, query: &str) -> (reqwest::StatusCode, Value) {
    let (status, body) = within(
        "a poll answer",
        WAIT + Duration::from_secs(5),
        server.get(&format!("/poll/{uid}{query}")),
    )
    .await;
    (status, body)
}

fn event_ids(body: &Value) -> Vec<u64> {
    body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id").parse().expect("numeric"))
        .collect()
}

#[tokio::test]
async fn a_poll_answers_at_once_with_everything_queued() {
    let server = Server::start().await;
    let uid = uid("poll-queue");
    server.connect(&uid, ":data").await;
    let ids = server
        .publish_batch(&[
            (":data", json!(1)),
            (":data", json!({"two": 2})),
            (":data", json!("3")),
        ])
        .await;
    let started = Instant::now();
    let (status, body) = poll(&server, &uid, "?timeout=20").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at once"
    );
    assert_eq!(event_ids(&body), ids);
    assert_eq!(body["events"][1]["message"], json!({"two": 2}));
    assert_eq!(body["events"][0]["track"], ":data");
    assert_eq!(body["last_event_id"], ids[2].to_string());
}

#[tokio::test]
async fn a_poll_waits_for_a_live_message_or_answers_empty_after_its_timeout() {
    let server = Server::start().await;
    let uid = uid("poll-live");
    server.connect(&uid, ":data").await;
    let (status, body) = poll(&server, &uid, "?timeout=0.3").await;
    assert_eq!(status, 200);
    assert_eq!(event_ids(&body), Vec::<u64>::new());
    assert_eq!(body["last_event_id"], "0");

    let (answer, id) = tokio::join!(poll(&server, &uid, "?timeout=20&last_event_id=0"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.publish(":data", json!("live")).await
    });
    assert_eq!(event_ids(&answer.1), vec![id]);
}

#[tokio::test]
async fn the_next_polls_cursor_acknowledges_and_nothing_is_sent_twice() {
    let server = Server::start().await;
    let uid = uid("poll-ack");
    server.connect(&uid, ":data").await;
    let a = server.publish(":data", json!("a")).await;
    // Without a cursor the answer is sent again until acknowledged.
    assert_eq!(
        event_ids(&poll(&server, &uid, "?timeout=1").await.1),
        vec![a]
    );
    assert_eq!(
        event_ids(&poll(&server, &uid, "?timeout=1").await.1),
        vec![a]
    );
    // Acknowledge `a`: the next poll (with its cursor) waits for new messages.
    let b = server.publish(":data", json!("b")).await;
    let body = poll(&server, &uid, &format!("?timeout=1&last_event_id={a}"))
        .await
        .1;
    assert_eq!(event_ids(&body), vec![b]);
    // The acknowledgement sticks: a cursorless poll later starts after `a`.
    common::eventually("the acknowledged cursor", WAIT, || async {
        let body = poll(&server, &uid, "?timeout=0").await.1;
        (event_ids(&body) == vec![b]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_poll_reports_a_reset_for_a_cursor_older_than_what_is_kept() {
    let server = Server::start_args(&["--max-stored-messages", "2"]).await;
    let uid = uid("poll-reset");
    server.connect(&uid, ":data").await;
    let mut last = 0;
    for i in 0..6 {
        last = server.publish(":data", json!(i)).await;
    }
    let body = poll(&server, &uid, "?timeout=1&last_event_id=0").await.1;
    assert_eq!(body["reset"], true, "{body}");
    assert_eq!(body["last_event_id"], last.to_string());
    assert_eq!(event_ids(&body), Vec::<u64>::new());
}

#[tokio::test]
async fn poll_errors_are_json() {
    let server = Server::start().await;
    assert_error(
        &poll(&server, &uid("poll-unknown"), "").await,
        404,
        "unknown_listener",
    );
    let uid = uid("poll-bad");
    server.connect(&uid, ":data").await;
    assert_error(
        &poll(&server, &uid, "?timeout=61").await,
        400,
        "bad_timeout",
    );
    assert_error(
        &poll(&server, &uid, "?timeout=soon").await,
        400,
        "bad_timeout",
    );
    assert_error(
        &poll(&server, &uid, "?last_event_id=x1").await,
        400,
        "bad_event_id",
    );
    assert_error(&poll(&server, "bad/uid", "").await, 404, "not_found");
    assert_error(&poll(&server, "short", "").await, 400, "bad_uid");
}

#[tokio::test]
async fn a_client_that_vanishes_mid_poll_loses_nothing() {
    let server = Server::start().await;
    let uid = uid("poll-vanish");
    server.connect(&uid, ":data").await;
    for _ in 0..5 {
        let mut socket = tokio::net::TcpStream::connect(server.addr())
            .await
            .expect("connect");
        let request = format!("GET /poll/{uid}?timeout=30 HTTP/1.1\r\nHost: x\r\n\r\n");
        socket.write_all(request.as_bytes()).await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(socket);
    }
    // Messages published while those polls were cut are still the listener's.
    let ids = server
        .publish_batch(&[(":data", json!("x")), (":data", json!("y"))])
        .await;
    let body = poll(&server, &uid, "?timeout=5").await.1;
    assert_eq!(event_ids(&body), ids);
    assert!(server.healthy().await);
}

#[tokio::test]
async fn a_poll_answers_at_once_when_the_server_shuts_down() {
    let mut server = Server::spawn().await;
    let uid = uid("poll-shutdown");
    server.connect(&uid, ":data").await;
    let url = format!("{}/poll/{uid}?timeout=30", server.url());
    let pending = tokio::spawn(async move {
        let response = reqwest::get(url).await?;
        let status = response.status();
        response.text().await.map(|body| (status, body))
    });
    // The poll is waiting in the server, not merely sent.
    common::eventually("the poll to be open", WAIT, || async {
        (server.stats().await["streams"]["poll"] == 1).then_some(())
    })
    .await;
    let started = Instant::now();
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let (status, body) = within("the pending poll", WAIT, pending)
        .await
        .expect("task")
        .expect("an answer, not a cut connection");
    assert_eq!(status, 200, "{body}");
    // The whole answer: no events, and the cursor to come back with.
    let body: Value = serde_json::from_str(&body).expect("a JSON answer");
    assert_eq!(body, json!({"events": [], "last_event_id": "0"}));
}

#[tokio::test]
async fn a_zero_timeout_poll_still_answers_with_what_is_queued_after_a_restart() {
    let mut server = Server::spawn().await;
    let uid = uid("poll-zero");
    server.connect(&uid, ":data").await;
    let ids = server
        .publish_batch(&[
            (":data", json!(1)),
            (":data", json!(2)),
            (":data", json!(3)),
        ])
        .await;
    for _ in 0..5 {
        server.kill9().await;
        server.restart().await;
        let body = poll(&server, &uid, "?timeout=0&last_event_id=0").await.1;
        assert_eq!(event_ids(&body), ids, "{body}");
    }
}
