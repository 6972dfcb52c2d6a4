//! Publishes (and connects) served straight on the socket (`api::direct`): several on one kept-alive
//! connection, pipelined, then another request on it that the framework answers; and
//! every answer — success or error — the same as the framework path gives for the same
//! request, byte for byte in its status and body.

mod common;

use common::{API_KEY, Server, uid};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A raw HTTP/1.1 connection, reading answers one after another (pipelining kept).
struct Raw {
    stream: TcpStream,
    read: Vec<u8>,
}

impl Raw {
    async fn open(server: &Server) -> Raw {
        Raw {
            stream: TcpStream::connect(server.addr()).await.expect("connect"),
            read: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next answer, or `None` when the server closed the connection first.
    async fn answer(&mut self) -> Option<Answer> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(head)) = response.parse(&self.read) {
                let headers: Vec<(String, String)> = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let status = response.code.expect("a status");
                let length: usize = headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .map(|(_, v)| v.parse().expect("a length"))
                    .expect("content-length");
                while self.read.len() < head + length {
                    self.more().await?;
                }
                let body = self.read[head..head + length].to_vec();
                self.read.drain(..head + length);
                return Some(Answer {
                    status,
                    headers,
                    body,
                });
            }
            self.more().await?;
        }
    }

    async fn more(&mut self) -> Option<()> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(common::WAIT, self.stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .ok()?;
        if n == 0 {
            return None;
        }
        self.read.extend_from_slice(&chunk[..n]);
        Some(())
    }
}

/// A publish request: `body` to `/api/v1/update` with `extra` header lines.
fn publish(body: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST /api/v1/update HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {API_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A connect request with `body`.
fn connect(body: &str) -> Vec<u8> {
    String::from_utf8_lossy(&publish(body, ""))
        .replacen("/api/v1/update", "/api/v1/connect", 1)
        .into_bytes()
}

const STATS: &[u8] =
    b"GET /api/v1/stats HTTP/1.1\r\nhost: x\r\nauthorization: Bearer test-api-key\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_on_one_connection_are_answered_in_order_then_hyper_takes_over() {
    let server = Server::start().await;
    let u = uid("direct");
    server.connect(&u, ":direct").await;
    let mut sse = server.listen(&u).await;
    let mut raw = Raw::open(&server).await;
    // Three publishes in one write; the second spread over lines with its keys
    // unsorted, the third a batch.
    let mut requests = publish(r#"{"track":":direct","message":1}"#, "");
    requests.extend(publish(
        "{\n  \"message\" : { \"z\" : [1, 2.50], \"a\" : \"x y\" },\n  \"track\" : \":direct\"\n}",
        "",
    ));
    requests.extend(publish(
        r#"{"updates":[{"track":":direct","message":"b1"},{"track":":direct","message":"b2"}]}"#,
        "",
    ));
    raw.send(&requests).await;
    let first = raw.answer().await.expect("first answer");
    assert_eq!(first.status, 200);
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert!(first.header("date").is_some(), "{:?}", first.headers);
    let id: u64 = first.json()["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("number");
    let second = raw.answer().await.expect("second answer");
    assert_eq!(second.json(), json!({"id": (id + 1).to_string()}));
    let third = raw.answer().await.expect("third answer");
    assert_eq!(
        third.json(),
        json!({"ids": [(id + 2).to_string(), (id + 3).to_string()]})
    );
    // Delivered in order; the spread-out message as sent, without its whitespace.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(sse.next_event().await);
    }
    assert_eq!(seen[0].message(), &json!(1));
    assert_eq!(seen[1].pos(), id + 1);
    assert_eq!(seen[1].message(), &json!({"z": [1, 2.5], "a": "x y"}));
    assert_eq!(seen[3].message(), &json!("b2"));
    // Another kind of request on the same connection: the framework answers it, and
    // publishes after it too.
    raw.send(STATS).await;
    let stats = raw.answer().await.expect("stats");
    assert_eq!(stats.status, 200);
    assert_eq!(stats.json()["messages_published"], 4);
    raw.send(&publish(r#"{"track":":direct","message":5}"#, ""))
        .await;
    let fifth = raw.answer().await.expect("fifth");
    assert_eq!(fifth.json(), json!({"id": (id + 4).to_string()}));
    // The raw SSE frame carries the message exactly as kept.
    assert_eq!(sse.next_event().await.pos(), id + 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_on_the_direct_path_is_the_frameworks() {
    let server = Server::start().await;
    let over = format!(r#"{{"track":":d","message":"{}"}}"#, "x".repeat(70_000));
    let cases: Vec<Vec<u8>> = vec![
        publish(r#"{"track":":d","message":1}"#, ""),
        publish(r#"{"track":":d","message":1}"#, "idempotency-key: {key}\r\n"),
        publish(r#"{"track":":d","message":1}"#, "idempotency-key: {key}\r\n"),
        publish(r#"{"track":":d","message":2}"#, "idempotency-key: {key}\r\n"),
        publish(r#"{"track":":d","message":1}"#, "idempotency-key: a\r\nidempotency-key: b\r\n"),
        publish(r#"{"track":":d","message":1}"#, "idempotency-key: \u{7f}\r\n"),
        publish("{", ""),
        publish("[1]", ""),
        publish(r#"{"track":":d","message":1e999}"#, ""),
        publish(r#"{"track":":d","message":1,"x":2}"#, ""),
        publish(r#"{"track":"a b","message":1}"#, ""),
        publish(r#"{"updates":[]}"#, ""),
        publish(r#"{"updates":[{"track":":d"}]}"#, ""),
        publish(r#"{"track":":d","message":1}"#, "x-other: 1\r\n"),
        b"POST /api/v1/update HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong\r\ncontent-length: 2\r\n\r\n{}"
            .to_vec(),
        b"POST /api/v1/update HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
        format!(
            "POST /api/v1/update HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {API_KEY}\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n{{}}"
        )
        .into_bytes(),
        publish(&over, ""),
        String::from_utf8_lossy(&publish(r#"{"track":":d","message":1}"#, ""))
            .replace("content-length: ", "content-length: +")
            .into_bytes(),
        connect(r#"{"uid":"direct-listener-1","track":":d"}"#),
        connect(r#"{"uid":"direct-listener-1","track":":d"}"#),
        connect(r#"{"uid":"short","track":":d"}"#),
        connect(r#"{"uid":"direct-listener-1","track":":d","x":1}"#),
        connect(r#"{"track":":d"}"#),
        connect("[]"),
        connect("{"),
    ];
    for case in &cases {
        // Straight on a fresh connection (the direct path), then on a connection the
        // framework already serves (after a stats call).
        // Each path with its own idempotency key, so that each sees its first use.
        let with_key = |key: &str| {
            String::from_utf8_lossy(case)
                .replace("{key}", key)
                .into_bytes()
        };
        let mut direct = Raw::open(&server).await;
        direct.send(&with_key("k-direct")).await;
        let direct = direct.answer().await.expect("a direct answer");
        let mut framework = Raw::open(&server).await;
        framework.send(STATS).await;
        framework.answer().await.expect("stats");
        framework.send(&with_key("k-framework")).await;
        let framework = framework.answer().await.expect("a framework answer");
        let request = String::from_utf8_lossy(&case[..case.len().min(300)]);
        assert_eq!(direct.status, framework.status, "{request}");
        if direct.status == 200 && case.starts_with(b"POST /api/v1/connect") {
            assert_eq!(direct.json(), framework.json(), "{request}");
        } else if direct.status == 200 {
            // Two publishes: other ids, the same shape.
            let keys = |v: Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
            assert_eq!(keys(direct.json()), keys(framework.json()), "{request}");
        } else {
            assert_eq!(
                String::from_utf8_lossy(&direct.body),
                String::from_utf8_lossy(&framework.body),
                "{request}"
            );
        }
        assert_eq!(
            direct.header("connection"),
            framework.header("connection"),
            "{request}"
        );
        assert_eq!(
            direct.header("idempotent-replayed"),
            framework.header("idempotent-replayed"),
            "{request}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_and_chunked_bodies_are_honoured() {
    let server = Server::start().await;
    // `Connection: close`: answered, then closed.
    let mut raw = Raw::open(&server).await;
    raw.send(&publish(
        r#"{"track":":c","message":1}"#,
        "connection: close\r\n",
    ))
    .await;
    assert_eq!(raw.answer().await.expect("answer").status, 200);
    assert!(raw.answer().await.is_none(), "closed after the answer");
    // A chunked publish goes to the framework, which takes it.
    let mut raw = Raw::open(&server).await;
    let body = r#"{"track":":c","message":2}"#;
    raw.send(
        format!(
            "POST /api/v1/update HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {API_KEY}\r\n\
             transfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let answer = raw.answer().await.expect("answer");
    assert_eq!(
        answer.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
    // A head sent in pieces is waited for.
    let mut raw = Raw::open(&server).await;
    let request = publish(r#"{"track":":c","message":3}"#, "");
    for piece in request.chunks(7) {
        raw.send(piece).await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert_eq!(raw.answer().await.expect("answer").status, 200);
    assert_eq!(server.stats().await["messages_published"], 3);
}
