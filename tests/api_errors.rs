//! Every error the backend API and the listener endpoint can answer over HTTP: the
//! status, the `{"error": {"code", "message"}}` shape and the code — never a 500 for bad
//! input — and the server still works afterwards.

mod common;

use common::{API_KEY, Server, Sse, assert_error, read_json, uid};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// POSTs raw `body` with `content_type` (none if `None`) and the api key.
async fn post_raw(
    server: &Server,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let mut request = server
        .client()
        .post(format!("{}{path}", server.url()))
        .bearer_auth(API_KEY)
        .body(body);
    if let Some(kind) = content_type {
        request = request.header("content-type", kind);
    }
    read_json(request.send().await.expect("send")).await
}

/// After a test of bad input: the server is healthy and still publishes and delivers.
async fn still_works(server: &Server) {
    assert!(server.healthy().await);
    let u = uid("after");
    server.connect(&u, ":after").await;
    let mut sse = server.listen(&u).await;
    let id = server.publish(":after", json!("still works")).await;
    assert_eq!(sse.next_event().await.pos(), id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_api_key_is_401() {
    let server = Server::start().await;
    let client = server.client();
    let url = format!("{}/api/v1/update", server.url());
    let body = json!({"track": ":data", "message": 1});
    let answer = read_json(client.post(&url).json(&body).send().await.expect("send")).await;
    assert_error(&answer, 401, "missing_api_key");
    for auth in [
        "Bearer wrong",
        "Bearer ",
        "Basic dGVzdC1hcGkta2V5",
        API_KEY,
        "Bearer test-api-ke",
        "Bearer test-api-keyy",
    ] {
        let response = client
            .post(&url)
            .header("authorization", auth)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_error(&read_json(response).await, 401, "wrong_api_key");
    }
    // Every backend call is guarded, GETs included.
    for path in ["/api/v1/stats", "/api/v1/listeners/abcdefgh"] {
        let response = client
            .get(format!("{}{path}", server.url()))
            .send()
            .await
            .expect("send");
        assert_error(&read_json(response).await, 401, "missing_api_key");
    }
    for path in ["connect", "disconnect", "tokens"] {
        let response = client
            .post(format!("{}/api/v1/{path}", server.url()))
            .json(&json!({"uid": "abcdefgh", "track": ":data"}))
            .send()
            .await
            .expect("send");
        assert_error(&read_json(response).await, 401, "missing_api_key");
    }
    // The key checks before the body: nothing was stored.
    assert_eq!(server.stats().await["messages_published"], 0);
    still_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400_bad_json() {
    let server = Server::start().await;
    for body in [
        "{",
        "{\"track\": \":data\", \"message\": }",
        "not json at all",
        "",
        "{\"track\": \":data\", \"message\": 1} trailing",
        "{\"track\": \":data\", \"message\": 1e999}",
        "\u{feff}{}",
    ] {
        let answer = post_raw(&server, "/api/v1/update", Some("application/json"), body).await;
        assert_error(&answer, 400, "bad_json");
    }
    // Deep nesting is refused, not a stack overflow.
    let deep = format!(
        "{{\"track\":\":d\",\"message\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let answer = post_raw(&server, "/api/v1/update", Some("application/json"), deep).await;
    assert_error(&answer, 400, "bad_json");
    // Invalid UTF-8.
    let answer = post_raw(
        &server,
        "/api/v1/update",
        Some("application/json"),
        b"{\"track\": \":d\xff\", \"message\": 1}".to_vec(),
    )
    .await;
    assert_error(&answer, 400, "bad_json");
    still_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_shapes_and_types_are_400_bad_request() {
    let server = Server::start().await;
    let cases = [
        ("update", json!([1, 2])),
        ("update", json!("a string")),
        ("update", json!(null)),
        ("update", json!({})),
        ("update", json!({"track": ":data"})),
        ("update", json!({"message": 1})),
        ("update", json!({"track": 5, "message": 1})),
        ("update", json!({"track": null, "message": 1})),
        ("update", json!({"track": [":data"], "message": 1})),
        (
            "update",
            json!({"track": ":data", "message": 1, "extra": true}),
        ),
        (
            "update",
            json!({"track": ":data", "message": 1, "Track": ":data"}),
        ),
        (
            "update",
            json!({"updates": {"track": ":data", "message": 1}}),
        ),
        ("update", json!({"updates": [1]})),
        ("update", json!({"updates": [{"track": ":data"}]})),
        (
            "update",
            json!({"updates": [{"track": ":data", "message": 1, "x": 1}]}),
        ),
        (
            "update",
            json!({"updates": [{"track": ":d", "message": 1}], "track": ":d"}),
        ),
        ("connect", json!({"uid": "abcdefgh"})),
        ("connect", json!({"track": ":data"})),
        ("connect", json!({"uid": 12345678, "track": ":data"})),
        (
            "connect",
            json!({"uid": "abcdefgh", "track": ":data", "tracks": [":x"]}),
        ),
        ("disconnect", json!({})),
        ("disconnect", json!({"uid": "abcdefgh", "track": 1})),
        ("disconnect", json!({"uid": "abcdefgh", "other": 1})),
        ("tokens", json!({})),
        ("tokens", json!({"uid": "abcdefgh", "tracks": ":data"})),
        ("tokens", json!({"uid": "abcdefgh", "tracks": [1]})),
        ("tokens", json!({"uid": "abcdefgh", "unknown": 1})),
    ];
    for (path, body) in cases {
        let answer = server.api(path, body.clone()).await;
        assert_eq!(
            answer.0,
            StatusCode::BAD_REQUEST,
            "{path} {body}: {}",
            answer.1
        );
        assert_error(&answer, 400, "bad_request");
    }
    assert_eq!(server.stats().await["messages_published"], 0);
    still_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_are_400_bad_track_and_bad_uid() {
    let server = Server::start().await;
    let long_track = "t".repeat(257);
    for track in [
        "",
        "a b",
        "tab\there",
        "new\nline",
        "nul\u{0}",
        "bell\u{7}",
        "nbsp\u{a0}x",
        long_track.as_str(),
    ] {
        for (path, body) in [
            ("update", json!({"track": track, "message": 1})),
            (
                "update",
                json!({"updates": [{"track": ":ok", "message": 1}, {"track": track, "message": 2}]}),
            ),
            ("connect", json!({"uid": "abcdefgh", "track": track})),
            ("disconnect", json!({"uid": "abcdefgh", "track": track})),
        ] {
            assert_error(&server.api(path, body).await, 400, "bad_track");
        }
    }
    // The longest and the odd-but-allowed ones pass.
    for track in [
        "t".repeat(256).as_str(),
        ":some/path-that/has-slashes;x",
        "héllo",
        "\"quoted\"",
    ] {
        server.publish(track, json!(1)).await;
    }
    let long_uid = "u".repeat(129);
    for bad in [
        "short",
        "",
        "has space1",
        "has/slash1",
        "ünicode12",
        "semi;colon",
        long_uid.as_str(),
    ] {
        assert_error(
            &server
                .api("connect", json!({"uid": bad, "track": ":data"}))
                .await,
            400,
            "bad_uid",
        );
        assert_error(
            &server.api("disconnect", json!({"uid": bad})).await,
            400,
            "bad_uid",
        );
        assert_error(
            &server.api("tokens", json!({"uid": bad})).await,
            400,
            "bad_uid",
        );
    }
    for bad in [
        "short",
        "semi;colon",
        "dots..%2F..",
        long_uid.as_str(),
        "%C3%BCnicode12",
        "with%20space",
    ] {
        assert_error(
            &server.get(&format!("/api/v1/listeners/{bad}")).await,
            400,
            "bad_uid",
        );
        let refused = Sse::open(&server.listen_url(bad, ""), None)
            .await
            .expect_err("bad uid");
        assert_error(&refused.answer(), 400, "bad_uid");
    }
    // Exactly 8 and exactly 128 characters are fine.
    server.connect("A-b_c.9z", ":data").await;
    server.connect(&"u".repeat(128), ":data").await;
    still_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_1_to_1000_updates_and_all_or_nothing() {
    let server = Server::start().await;
    assert_error(
        &server.api("update", json!({"updates": []})).await,
        400,
        "bad_batch",
    );
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"track": ":d", "message": i}))
        .collect();
    assert_error(
        &server.api("update", json!({"updates": too_many})).await,
        400,
        "bad_batch",
    );
    // One bad update refuses the whole batch.
    let mixed = json!({"updates": [
        {"track": ":d", "message": 1},
        {"track": "bad track", "message": 2},
    ]});
    let answer = server.api("update", mixed).await;
    assert_error(&answer, 400, "bad_track");
    let message = answer.1["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("updates[1]"),
        "names the bad update: {message}"
    );
    assert_eq!(server.stats().await["messages_stored"], 0);
    let max: Vec<Value> = (0..1000)
        .map(|i| json!({"track": ":d", "message": i}))
        .collect();
    let (status, body) = server.api("update", json!({"updates": max})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ids"].as_array().map(Vec::len), Some(1000));
    assert_eq!(server.stats().await["messages_stored"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_is_413_message_too_large() {
    let server = Server::start().await;
    // The limit is on the message serialized as compact JSON: 65536 bytes by default.
    let fits = "x".repeat(65536 - 2);
    server.publish(":data", json!(fits)).await;
    let over = "x".repeat(65536 - 1);
    assert_error(
        &server
            .api("update", json!({"track": ":data", "message": over}))
            .await,
        413,
        "message_too_large",
    );
    let in_batch =
        json!({"updates": [{"track": ":d", "message": 1}, {"track": ":d", "message": over}]});
    assert_error(
        &server.api("update", in_batch).await,
        413,
        "message_too_large",
    );
    assert_eq!(server.stats().await["messages_stored"], 1);
    still_works(&server).await;
}

/// The request body limit with the default `max_message_bytes`.
const BODY_LIMIT: usize = 8 * 1024 * 1024;

/// Sends over a raw socket the head of a POST /api/v1/update declaring a
/// `declared`-byte JSON body, then only the first `sent` bytes of that body, and reads
/// the answer. When `sent` is just over the limit the server has read everything sent
/// by the time it refuses, so its answer cannot be lost to a reset.
async fn post_truncated(server: &Server, declared: usize, sent: usize) -> (StatusCode, Value) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    let head = format!(
        "POST /api/v1/update HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n",
        server.addr()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let mut body = br#"{"track":":data","message":""#.to_vec();
    body.resize(sent, b'x');
    if sent == declared {
        // A complete, valid JSON body.
        body.truncate(sent - 2);
        body.extend_from_slice(b"\"}");
    }
    stream.write_all(&body).await.expect("body");
    let (status, json) = common::read_response(&mut stream).await;
    (StatusCode::from_u16(status).expect("status"), json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_8_mib_is_413_body_too_large_and_the_server_stays_up() {
    let server = Server::spawn().await;
    let before = server.rss_kib();
    // One byte over the limit, declared as that or much larger: refused at once.
    for declared in [BODY_LIMIT + 1, 12 * 1024 * 1024, 1 << 30] {
        let answer = post_truncated(&server, declared, BODY_LIMIT + 1).await;
        assert_error(&answer, 413, "body_too_large");
    }
    // Exactly at the limit the body is read, and refused for what it holds: the
    // message is over max_message_bytes.
    let answer = post_truncated(&server, BODY_LIMIT, BODY_LIMIT).await;
    assert_error(&answer, 413, "message_too_large");

    // A batch of many ordinary messages under the limit is fine.
    let big_batch: Vec<Value> = (0..120)
        .map(|i| json!({"track": ":data", "message": format!("{i}{}", "y".repeat(60_000))}))
        .collect();
    let (status, body) = server.api("update", json!({"updates": big_batch})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let after = server.rss_kib();
    assert!(
        after < before + 150 * 1024,
        "RSS went from {before} to {after} KiB"
    );
    still_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_streaming_a_huge_body_is_stopped_and_the_server_stays_up() {
    // An ordinary client sending all of a 12 MiB body. The server answers 413 as soon
    // as the body is over the limit and closes the connection (HTTP allows it), so the
    // client either reads the 413 or, while still sending, sees the connection cut
    // (hyper does no lingering close). Either way the server must stay up.
    let server = Server::start().await;
    // A client of its own: after such a refusal the server closes the connection
    // without saying `Connection: close`, and a pooled connection must not be reused.
    let client = reqwest::Client::new();
    let huge = format!(
        "{{\"track\":\":data\",\"message\":\"{}\"}}",
        "x".repeat(12 * 1024 * 1024)
    );
    for _ in 0..3 {
        let sent = client
            .post(format!("{}/api/v1/update", server.url()))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(huge.clone())
            .send()
            .await;
        match sent {
            Ok(response) => assert_error(&read_json(response).await, 413, "body_too_large"),
            Err(e) => assert!(e.is_request() || e.is_body(), "cut while sending: {e:?}"),
        }
    }
    drop(client);
    assert_eq!(server.stats().await["messages_stored"], 0);
    still_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_json_is_415_not_json() {
    let server = Server::start().await;
    let body = r#"{"track": ":data", "message": 1}"#;
    for kind in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
    ] {
        let answer = post_raw(&server, "/api/v1/update", Some(kind), body).await;
        assert_error(&answer, 415, "not_json");
    }
    // JSON by any of its names is fine, and so is no Content-Type at all.
    for kind in [
        Some("application/json; charset=utf-8"),
        Some("Application/JSON"),
        Some("application/merge-patch+json"),
        None,
    ] {
        let (status, answer) = post_raw(&server, "/api/v1/update", kind, body).await;
        assert_eq!(status, StatusCode::OK, "{kind:?}: {answer}");
    }
    still_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let server = Server::start().await;
    let client = server.client();
    for path in [
        "/nope",
        "/api/v1/nope",
        "/api/v2/update",
        "/listen",
        "/listen/abcdefgh/extra",
    ] {
        let response = client
            .get(format!("{}{path}", server.url()))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("send");
        assert_error(&read_json(response).await, 404, "not_found");
    }
    let wrong_methods = [
        (reqwest::Method::GET, "/api/v1/update"),
        (reqwest::Method::PUT, "/api/v1/connect"),
        (reqwest::Method::DELETE, "/api/v1/disconnect"),
        (reqwest::Method::POST, "/api/v1/stats"),
        (reqwest::Method::DELETE, "/api/v1/listeners/abcdefgh"),
        (reqwest::Method::GET, "/api/v1/tokens"),
        (reqwest::Method::POST, "/listen/abcdefgh"),
        (reqwest::Method::POST, "/healthz"),
    ];
    for (method, path) in wrong_methods {
        let response = client
            .request(method.clone(), format!("{}{path}", server.url()))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("send");
        let answer = read_json(response).await;
        assert_eq!(answer.0, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_error(&answer, 405, "method_not_allowed");
    }
    still_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_calls_without_a_secret_or_with_a_bad_ttl_are_400() {
    let server = Server::start().await;
    assert_error(
        &server.api("tokens", json!({"uid": "abcdefgh"})).await,
        400,
        "no_token_secret",
    );
    let with_secret = Server::start_args(&["--token-secret", "s3cret"]).await;
    for ttl in [
        json!(0),
        json!(-1),
        json!(1.5),
        json!("60"),
        json!(604_801),
        json!(true),
    ] {
        assert_error(
            &with_secret
                .api("tokens", json!({"uid": "abcdefgh", "ttl_seconds": ttl}))
                .await,
            400,
            "bad_ttl",
        );
    }
    assert_error(
        &with_secret
            .api(
                "tokens",
                json!({"uid": "abcdefgh", "tracks": ["bad track"]}),
            )
            .await,
        400,
        "bad_track",
    );
    let (status, body) = with_secret
        .api("tokens", json!({"uid": "abcdefgh", "ttl_seconds": 604_800}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// What an odd request must be answered with.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// A JSON error with this status and code.
    Error(u16, &'static str),
    /// An event stream (the oddity is harmless, like an unknown query parameter).
    Stream,
}

/// GETs each path; returns those not answered exactly as expected.
async fn wrong_answers(server: &Server, cases: &[(String, Answer)]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (path, expected) in cases {
        let response = server
            .client()
            .get(format!("{}{path}", server.url()))
            .bearer_auth(API_KEY)
            .timeout(std::time::Duration::from_secs(2))
            .send()
            .await
            .expect("send");
        let status = response.status();
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let right = match expected {
            Answer::Stream => status == StatusCode::OK && kind == "text/event-stream",
            Answer::Error(want, code) => {
                let text = response.text().await.unwrap_or_default();
                let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let right = status.as_u16() == *want
                    && body["error"]["code"] == *code
                    && body["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty());
                if !right {
                    wrong.push(format!(
                        "{path}: expected {expected:?}, got {status} {text:?}"
                    ));
                }
                continue;
            }
        };
        if !right {
            wrong.push(format!(
                "{path}: expected {expected:?}, got {status} {kind}"
            ));
        }
    }
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_listener_requests_are_answered_in_json_never_500() {
    let server = Server::start().await;
    let u = uid("odd");
    server.connect(&u, ":data").await;
    let client = server.client();
    let odd = [
        (
            format!("/listen/{u}?last_event_id=1&last_event_id=2"),
            Answer::Error(400, "bad_request"),
        ),
        (
            format!("/listen/{u}?token=a&token=b"),
            Answer::Error(400, "bad_request"),
        ),
        (
            format!("/listen/{u}?last_event_id=%FF"),
            Answer::Error(400, "bad_event_id"),
        ),
        // An unknown parameter is ignored.
        (format!("/listen/{u}?%zz"), Answer::Stream),
        (
            "/listen/%FF%FE%FD%FC%FB%FA%F9%F8".to_owned(),
            Answer::Error(400, "bad_uid"),
        ),
        (
            "/api/v1/listeners/%FF%FE%FD%FC%FB%FA%F9%F8".to_owned(),
            Answer::Error(400, "bad_uid"),
        ),
        (
            format!("/listen/{}", "u".repeat(10_000)),
            Answer::Error(400, "bad_uid"),
        ),
    ];
    let wrong = wrong_answers(&server, &odd).await;
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    // A Last-Event-ID that is not even text.
    let response = client
        .get(server.listen_url(&u, ""))
        .header(
            "last-event-id",
            reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").expect("header"),
        )
        .send()
        .await
        .expect("send");
    assert_error(&read_json(response).await, 400, "bad_event_id");
    still_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_websocket_and_long_poll_requests_are_answered_in_json_never_500() {
    let server = Server::start().await;
    let u = uid("oddwp");
    server.connect(&u, ":data").await;
    let mut odd = Vec::new();
    for endpoint in ["poll", "ws"] {
        odd.push((
            format!("/{endpoint}/{u}?last_event_id=1&last_event_id=2"),
            Answer::Error(400, "bad_request"),
        ));
        odd.push((
            format!("/{endpoint}/{u}?token=a&token=b"),
            Answer::Error(400, "bad_request"),
        ));
        odd.push((
            format!("/{endpoint}/%FF%FE%FD%FC%FB%FA%F9%F8"),
            Answer::Error(400, "bad_uid"),
        ));
    }
    odd.push(("/poll/short".to_owned(), Answer::Error(400, "bad_uid")));
    // A plain GET is not a WebSocket, whatever its uid.
    odd.push(("/ws/short".to_owned(), Answer::Error(400, "not_websocket")));
    let wrong = wrong_answers(&server, &odd).await;
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    still_works(&server).await;
}
