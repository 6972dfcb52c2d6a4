//! Graceful shutdown (SIGTERM): open streams end cleanly with a word to reconnect, the
//! process exits 0 within a few seconds, and what was acknowledged is kept.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Server, Sse, uid};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_500_open_streams_ends_each_cleanly_and_exits_0() {
    const UIDS: usize = 100;
    const STREAMS_EACH: usize = 5;
    let mut server = Server::start().await;
    let uids: Vec<String> = (0..UIDS).map(|_| uid("down")).collect();
    join_all(uids.iter().map(|u| server.connect(u, ":data"))).await;
    let opens = uids
        .iter()
        .flat_map(|u| std::iter::repeat_n(u, STREAMS_EACH))
        .map(|u| server.listen(u));
    let mut streams = join_all(opens).await;
    common::eventually("500 open streams", common::WAIT, || async {
        (server.stats().await["streams"]["sse"] == UIDS * STREAMS_EACH).then_some(())
    })
    .await;
    let id = server.publish(":data", json!("before shutdown")).await;
    for sse in streams.iter_mut() {
        assert_eq!(sse.next_event().await.pos(), id);
    }

    let started = Instant::now();
    let status = server.terminate_within(Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}; stderr:\n{}",
        server.stderr_text()
    );
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");

    let ends = streams
        .iter_mut()
        .map(|sse| sse.end_within(Duration::from_secs(5)));
    for (n, (blocks, end)) in join_all(ends).await.into_iter().enumerate() {
        assert_eq!(end, Ok(()), "stream {n} ended cleanly");
        assert!(
            blocks.iter().all(|b| b.data.is_none()),
            "stream {n}: {blocks:?}"
        );
        let said_reconnect = blocks
            .iter()
            .flat_map(|b| &b.comments)
            .any(|c| c.contains("reconnect"));
        assert!(
            said_reconnect,
            "stream {n} was told to reconnect: {blocks:?}"
        );
    }
    let refused = server
        .client()
        .get(format!("{}/healthz", server.url()))
        .send()
        .await;
    assert!(refused.is_err(), "nothing listens after the exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_publishing_keeps_every_acknowledged_message() {
    let mut server = Server::start().await;
    let u = uid("inflight");
    server.connect(&u, ":data").await;
    let acked: Arc<Mutex<BTreeMap<u64, Value>>> = Arc::default();
    let mut publishers = Vec::new();
    for p in 0..4 {
        let (url, key, acked) = (server.url(), server.api_key().to_owned(), acked.clone());
        publishers.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client");
            for i in 0..100_000 {
                let message = json!({"p": p, "i": i});
                let sent = client
                    .post(format!("{url}/api/v1/update"))
                    .bearer_auth(&key)
                    .json(&json!({"track": ":data", "message": message}))
                    .send()
                    .await;
                let Ok(response) = sent else { return };
                if response.status() != StatusCode::OK {
                    // 503 while shutting down is fine; nothing after it is acknowledged.
                    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
                    return;
                }
                let Ok(body) = response.json::<Value>().await else {
                    return;
                };
                acked
                    .lock()
                    .await
                    .insert(common::id_of(&body["id"]), message);
            }
        }));
    }
    common::eventually("some acknowledged messages", common::WAIT, || async {
        (acked.lock().await.len() >= 100).then_some(())
    })
    .await;
    let status = server.terminate().await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    for publisher in publishers {
        common::within("the publishers to stop", common::WAIT, publisher)
            .await
            .expect("publisher");
    }
    let acked = acked.lock().await.clone();
    server.restart().await;
    let mut sse = Sse::open(&server.listen_url(&u, "?last_event_id=0"), None)
        .await
        .expect("open");
    let last = *acked.keys().last().expect("acked");
    let mut got = BTreeMap::new();
    while got.keys().last().is_none_or(|id| *id < last) {
        let event = sse.next_event().await;
        assert!(
            got.keys().last().is_none_or(|id| *id < event.pos()),
            "in order, once"
        );
        got.insert(event.pos(), event.message().clone());
    }
    for (id, message) in &acked {
        assert_eq!(got.get(id), Some(message), "acknowledged {id} kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_reader_that_never_reads_still_exits_0_in_time() {
    use tokio::io::AsyncWriteExt;
    let mut server = Server::start().await;
    let u = uid("stuck");
    server.connect(&u, ":data").await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let mut stuck = socket
        .connect(server.addr().parse().expect("addr"))
        .await
        .expect("connect");
    let request = format!(
        "GET /listen/{u} HTTP/1.1\r\nHost: {}\r\n\r\n",
        server.addr()
    );
    stuck.write_all(request.as_bytes()).await.expect("send");
    common::eventually("the stream open", common::WAIT, || async {
        (server.listener(&u).await.1["online"] == 1).then_some(())
    })
    .await;
    // Fill the socket buffers so that not even the goodbye can be written.
    let padding = "z".repeat(4000);
    for _ in 0..25 {
        let updates: Vec<(&str, Value)> = (0..50).map(|_| (":data", json!(padding))).collect();
        server.publish_batch(&updates).await;
    }
    let started = Instant::now();
    let status = server.terminate_within(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    drop(stuck);
}
