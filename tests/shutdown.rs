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
    let mut server = Server::spawn().await;
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
    let mut server = Server::spawn().await;
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
                // A request that gets no answer at all is one the server never read: sent
                // on a kept-alive connection as the server closed it, idle, or to a
                // listener already closed. (One it has read is answered: see
                // `an_update_in_flight_when_sigterm_comes_is_answered_and_kept`.)
                let Ok(response) = sent else { return };
                if response.status() != StatusCode::OK {
                    // 503 while shutting down is fine; nothing after it is acknowledged.
                    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
                    return;
                }
                // Once answered, the answer is whole: a 200 is never cut.
                let body = response
                    .json::<Value>()
                    .await
                    .unwrap_or_else(|e| panic!("a 200 with its body cut: {e}"));
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
    let mut server = Server::spawn().await;
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

/// Reads one HTTP/1.1 answer head (up to the blank line) off a raw socket.
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        common::within("an answer head", common::WAIT, stream.read_exact(&mut byte))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the answer was cut ({e}) after {:?}",
                    String::from_utf8_lossy(&head)
                )
            });
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_in_flight_when_sigterm_comes_is_answered_and_kept() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut server = Server::spawn().await;
    let u = uid("midflight");
    server.connect(&u, ":data").await;
    // A large batch, sent in two halves around the signal.
    let updates: Vec<Value> = (0..200)
        .map(|i| json!({"track": ":data", "message": {"i": i, "pad": "p".repeat(1000)}}))
        .collect();
    let body = serde_json::to_vec(&json!({"updates": updates})).expect("json");
    let mut stream = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    // `Expect: 100-continue`: the server says `100 Continue` once the handler reads the
    // body, so the request is known to be in flight before the signal is sent.
    let head = format!(
        "POST /api/v1/update HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        server.addr(),
        server.api_key(),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("send head");
    let proceed = read_head(&mut stream).await;
    assert!(proceed.starts_with("HTTP/1.1 100"), "{proceed}");
    let half = body.len() / 2;
    stream.write_all(&body[..half]).await.expect("first half");

    let (addr, sigterm) = (server.addr().to_owned(), Instant::now());
    let exit = tokio::spawn(async move {
        let status = server.terminate_within(Duration::from_secs(10)).await;
        (server, status)
    });
    // The server is shutting down (its port refuses connections) before the rest of the
    // body is sent.
    common::eventually("the port to close", common::WAIT, || async {
        tokio::net::TcpStream::connect(&addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    stream.write_all(&body[half..]).await.expect("second half");
    let answer = read_head(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let length: usize = answer
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("a content-length: {answer}"));
    let mut json_body = vec![0u8; length];
    common::within(
        "the answer's body",
        common::WAIT,
        stream.read_exact(&mut json_body),
    )
    .await
    .expect("the whole body");
    let answer: Value = serde_json::from_slice(&json_body).expect("json");
    let ids: Vec<u64> = answer["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(common::id_of)
        .collect();
    assert_eq!(ids.len(), 200, "{answer}");
    let (mut server, status) = common::within("the exit", common::WAIT, exit)
        .await
        .expect("exit task");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        sigterm.elapsed() < Duration::from_secs(6),
        "{:?}",
        sigterm.elapsed()
    );

    // What was answered is kept.
    server.restart().await;
    let mut sse = Sse::open(&server.listen_url(&u, "?last_event_id=0"), None)
        .await
        .expect("open");
    let events = sse.events(200).await;
    assert_eq!(common::positions(&events), ids);
}
