//! The backend API's contract, over real sockets: the OpenAPI document the server serves
//! is `docs/openapi.json` and names every `/api/v1` route; generated bodies (any JSON,
//! any bytes) get a documented 4xx in the error shape, never a 5xx; and the direct
//! SSE path answers any `/listen` target as the framework path does.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{API_KEY, Server, read_json, uid};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generated bodies per operation: a few hundred in all, a few seconds against a debug
/// build.
const BODIES_PER_OPERATION: usize = 80;
/// Generated `/listen` targets sent down both paths.
const TARGETS: usize = 60;
const TOKEN_SECRET: &str = "openapi-test-secret";

fn repo_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn document() -> Value {
    serde_json::from_str(&repo_file("docs/openapi.json")).expect("docs/openapi.json is JSON")
}

/// The statuses the document lists for `method` on `path`.
fn documented_statuses(doc: &Value, path: &str, method: &str) -> BTreeSet<u16> {
    doc["paths"][path][method]["responses"]
        .as_object()
        .unwrap_or_else(|| panic!("{method} {path} is not in the document"))
        .keys()
        .filter_map(|status| status.parse().ok())
        .collect()
}

/// Every `.route("/api/v1/…", get(…).post(…))` in the sources: (path, methods).
fn routes_in_sources() -> BTreeSet<(String, String)> {
    // `pub const NAME: &str = "/api/v1/…";` of the crate the server and the bench share.
    let shared: std::collections::BTreeMap<String, String> = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/dolores-protocol/src/api.rs"),
    )
    .expect("read dolores-protocol's api.rs")
    .lines()
    .filter_map(|line| {
        let rest = line.trim().strip_prefix("pub const ")?;
        let (name, rest) = rest.split_once(": &str = \"")?;
        let (value, _) = rest.split_once('"')?;
        Some((name.to_owned(), value.to_owned()))
    })
    .collect();
    let mut found = BTreeSet::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read a source file");
            for call in text.split(".route(").skip(1) {
                let call = call.trim_start();
                // A literal path, or one of the shared `paths::NAME` constants.
                let (route, handlers) = if let Some(rest) = call.strip_prefix('"') {
                    let Some((route, handlers)) = rest.split_once('"') else {
                        continue;
                    };
                    (route.to_owned(), handlers)
                } else if let Some(rest) = call.strip_prefix("paths::") {
                    let end = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    let Some(route) = shared.get(&rest[..end]) else {
                        panic!(
                            "paths::{} is not in dolores-protocol's api.rs",
                            &rest[..end]
                        );
                    };
                    (route.clone(), &rest[end..])
                } else {
                    continue;
                };
                let route = route.as_str();
                if !route.starts_with("/api/v1/") {
                    continue;
                }
                // The handlers, up to the end of this call: `get(…)`, `.post(…)`.
                let handlers = handlers.split(".route(").next().unwrap_or_default();
                for method in ["get", "post", "put", "patch", "delete"] {
                    let called = handlers
                        .match_indices(&format!("{method}("))
                        .any(|(at, _)| {
                            !handlers[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_')
                        });
                    if called {
                        found.insert((route.to_owned(), method.to_owned()));
                    }
                }
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_docs_openapi_json_and_needs_no_key() {
    let server = Server::config().memory().start().await;
    let response = server
        .client()
        .get(format!("{}/api/v1/openapi.json", server.url()))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "served as JSON"
    );
    let served = response.text().await.expect("body");
    assert!(
        served == repo_file("docs/openapi.json"),
        "the served document is docs/openapi.json as it is"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_is_in_the_document_and_every_documented_call_is_served() {
    let doc = document();
    let routes = routes_in_sources();
    assert!(
        routes.contains(&("/api/v1/update".to_owned(), "post".to_owned())),
        "the route scan finds the routes: {routes:?}"
    );
    for (route, method) in &routes {
        assert!(
            doc["paths"][route][method].is_object(),
            "{} {route} is served but not in docs/openapi.json",
            method.to_uppercase()
        );
    }
    // And the other way: every documented call reaches a handler (an answer of its own,
    // not the router's `not_found` or `method_not_allowed`).
    let server = Server::config()
        .memory()
        .args(["--token-secret", TOKEN_SECRET])
        .start()
        .await;
    let paths = doc["paths"].as_object().expect("paths");
    for (path, operations) in paths {
        for method in operations.as_object().expect("operations").keys() {
            let url = format!("{}{}", server.url(), path.replace("{uid}", "abcdefgh"));
            let request = match method.as_str() {
                "get" => server.client().get(&url),
                "post" => server.client().post(&url).json(&json!({})),
                other => panic!("a method this test does not know: {other}"),
            };
            let (status, body) =
                read_json(request.bearer_auth(API_KEY).send().await.expect("send")).await;
            let code = body["error"]["code"].as_str().unwrap_or_default();
            assert!(
                !matches!(code, "not_found" | "method_not_allowed"),
                "{} {path} is documented but not served: {status} {body}",
                method.to_uppercase()
            );
            assert!(
                documented_statuses(&doc, path, method).contains(&status.as_u16()),
                "{} {path}: {status} is not documented",
                method.to_uppercase()
            );
        }
    }
}

/// Names: valid uids and tracks, and everything near them.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._-]{6,10}",
        ":[a-z/;]{0,8}",
        "\\PC{0,6}",
        "[\\s\\S]{0,4}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        (0u64..700_000).prop_map(Value::from),
        name().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(
                "uid|track|message|updates|tracks|ttl_seconds|\\PC{0,3}",
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A body as it goes on the wire: JSON near what the API takes, any JSON, or any bytes;
/// and a content type (usually JSON).
fn wire_body() -> impl Strategy<Value = (Vec<u8>, Option<&'static str>)> {
    // Mostly the uids connected before the test, and good tracks: bodies that should
    // pass come often enough to prove the generator reaches a 200.
    let uid = || prop_oneof![2 => "abcdefgh|A-b_c\\.9-", 1 => name()];
    let track = || prop_oneof![2 => ":[a-z/;]{1,8}", 1 => name()];
    let update = || (track(), json_value()).prop_map(|(t, m)| json!({"track": t, "message": m}));
    let ttl = prop_oneof![(0u64..700_000).prop_map(Value::from), json_value()];
    let near = prop_oneof![
        (uid(), track()).prop_map(|(u, t)| json!({"uid": u, "track": t})),
        uid().prop_map(|u| json!({"uid": u})),
        update(),
        proptest::collection::vec(update(), 0..4).prop_map(|u| json!({"updates": u})),
        (uid(), proptest::collection::vec(track(), 0..3), ttl)
            .prop_map(|(u, t, ttl)| json!({"uid": u, "tracks": t, "ttl_seconds": ttl})),
        (uid(), json_value()).prop_map(|(u, t)| json!({"uid": u, "tracks": t})),
    ];
    let bytes = prop_oneof![
        4 => near.prop_map(|v| v.to_string().into_bytes()),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
    ];
    let kind = prop_oneof![
        8 => Just(Some("application/json")),
        1 => Just(None),
        1 => Just(Some("text/plain")),
        1 => Just(Some("application/merge-patch+json; charset=utf-8")),
    ];
    (bytes, kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_bodies_get_a_documented_answer_never_a_5xx() {
    let doc = document();
    let server = Server::config()
        .memory()
        .args(["--token-secret", TOKEN_SECRET])
        .start()
        .await;
    // Some of the generated uids exist, so that disconnect also answers 200.
    for u in ["abcdefgh", "A-b_c.9-"] {
        server.connect(u, ":data").await;
    }
    let mut runner = TestRunner::deterministic();
    let strategy = wire_body();
    let mut answered = BTreeSet::new();
    for path in [
        "/api/v1/update",
        "/api/v1/connect",
        "/api/v1/disconnect",
        "/api/v1/tokens",
    ] {
        let documented = documented_statuses(&doc, path, "post");
        for _ in 0..BODIES_PER_OPERATION {
            let (bytes, kind) = strategy.new_tree(&mut runner).expect("a body").current();
            let mut request = server
                .client()
                .post(format!("{}{path}", server.url()))
                .bearer_auth(API_KEY)
                .body(bytes.clone());
            if let Some(kind) = kind {
                request = request.header("content-type", kind);
            }
            let response = request.send().await.expect("send");
            let status = response.status().as_u16();
            let text = response.text().await.expect("body");
            let sent = String::from_utf8_lossy(&bytes);
            assert!(
                documented.contains(&status),
                "POST {path} {sent}: {status} is not documented ({text})"
            );
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("POST {path} {sent}: not JSON: {text}"));
            if status == 200 {
                answered.insert((path, 200));
                continue;
            }
            answered.insert((path, status));
            let code = body["error"]["code"].as_str().unwrap_or_default();
            assert!(
                !code.is_empty() && code.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "POST {path} {sent}: {status} without a snake_case code: {text}"
            );
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "POST {path} {sent}: {status} without a message: {text}"
            );
        }
    }
    // The generator reaches both sides of every call, or it proves little.
    for path in ["/api/v1/update", "/api/v1/connect", "/api/v1/tokens"] {
        assert!(answered.contains(&(path, 200)), "{path}: never a 200");
        assert!(answered.contains(&(path, 400)), "{path}: never a 400");
    }
    assert!(server.healthy().await);
}

/// One request on a fresh connection; the status and the error code.
async fn answer_of(stream: &mut TcpStream, target: &str) -> (u16, String) {
    let head = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("write");
    read_answer(stream).await
}

/// Reads one answer with a `content-length` body: its status and error code.
async fn read_answer(stream: &mut TcpStream) -> (u16, String) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let body: Value =
                    serde_json::from_slice(&buffer[end + 4..end + 4 + length]).unwrap_or_default();
                let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
                return (status, code);
            }
        }
        let n = common::within("an answer", common::WAIT, stream.read(&mut chunk))
            .await
            .expect("read");
        if n == 0 {
            return (
                0,
                format!("closed after {:?}", String::from_utf8_lossy(&buffer)),
            );
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_sse_path_answers_any_target_as_the_framework_path_does() {
    let server = Server::config().memory().start().await;
    let known = uid("known");
    // A uid never connected: every target gets an error (no stream opens), so the two
    // answers can be compared whole.
    let strategy = (
        prop_oneof![
            Just(known.clone()),
            "[A-Za-z0-9._~-]{0,10}",
            "[A-Za-z0-9%]{0,12}"
        ],
        proptest::collection::vec(
            (
                "token|last_event_id|timeout|last%5Fevent%5Fid|x",
                "=|",
                "[0-9]{0,4}|[%0-9A-Fa-f+.=]{0,6}|[a-z]{0,3}",
            )
                .prop_map(|(k, eq, v)| format!("{k}{eq}{v}")),
            0..3,
        ),
    )
        .prop_map(|(segment, params)| format!("/listen/{segment}?{}", params.join("&")));
    let mut runner = TestRunner::deterministic();
    for _ in 0..TARGETS {
        let target = strategy.new_tree(&mut runner).expect("a target").current();
        // First request of a connection: served directly on the socket.
        let mut direct = TcpStream::connect(server.addr()).await.expect("connect");
        let direct = answer_of(&mut direct, &target).await;
        // Second request of a kept-alive connection: hyper and axum.
        let mut framework = TcpStream::connect(server.addr()).await.expect("connect");
        let first = answer_of(&mut framework, "/healthz").await;
        assert_eq!(first.0, 200, "healthz first");
        let framework = answer_of(&mut framework, &target).await;
        assert_eq!(
            direct, framework,
            "GET {target}: direct path, framework path"
        );
        assert!(
            direct.0 >= 400 && !direct.1.is_empty(),
            "{target}: {direct:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_takes_exactly_the_names_the_shared_vectors_call_valid() {
    let vectors: Value =
        serde_json::from_str(&repo_file("tests/vectors/names.json")).expect("names.json");
    let server = Server::config().memory().start().await;
    for (kind, code) in [("tracks", "bad_track"), ("uids", "bad_uid")] {
        for case in vectors[kind].as_array().expect("vectors") {
            let name = &case["name"];
            let body = if kind == "tracks" {
                json!({"uid": "abcdefgh", "track": name})
            } else {
                json!({"uid": name, "track": ":data"})
            };
            let (status, answer) = server.api("connect", body).await;
            let expected = if case["valid"] == true { 200 } else { 400 };
            assert_eq!(
                status, expected,
                "{kind}: {name} ({}): {answer}",
                case["why"]
            );
            if expected == 400 {
                assert_eq!(answer["error"]["code"], code, "{kind}: {name}");
            }
        }
    }
}
