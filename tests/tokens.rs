//! Listener tokens on a server started with `--token-secret`: HS256 JWTs with `sub` =
//! uid, `exp` checked with 60 s of leeway, and an optional `tracks` claim that connects
//! the listener when it opens its stream.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{Server, Sse, assert_error, uid};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

const SECRET: &str = "token-test-secret";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_secs()
}

/// Signs `claims` with `secret` and `algorithm`.
fn sign(claims: &Value, secret: &str, algorithm: Algorithm) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

async fn server() -> Server {
    Server::start_args(&["--token-secret", SECRET]).await
}

async fn open(server: &Server, uid: &str, token: Option<&str>) -> Result<Sse, common::Refused> {
    let query = token.map(|t| format!("?token={t}")).unwrap_or_default();
    Sse::open(&server.listen_url(uid, &query), None).await
}

/// The payload of a JWT, decoded without checking it.
fn payload(token: &str) -> Value {
    let part = token.split('.').nth(1).expect("three parts");
    let mut bits = 0u32;
    let mut n = 0;
    let mut bytes = Vec::new();
    for c in part.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("not base64url: {c}"),
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            bytes.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    serde_json::from_slice(&bytes).expect("JSON payload")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minted_token_with_tracks_connects_a_new_listener_and_delivers() {
    let server = server().await;
    let u = uid("minted");
    let (status, body) = server
        .api(
            "tokens",
            json!({"uid": u, "tracks": [":news", "rooms/1"], "ttl_seconds": 120}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["token"].as_str().expect("token").to_owned();
    let claims = payload(&token);
    assert_eq!(claims["sub"], u.as_str());
    assert_eq!(claims["tracks"], json!([":news", "rooms/1"]));
    let exp = claims["exp"].as_u64().expect("exp");
    assert!(
        exp.abs_diff(now() + 120) <= 5,
        "exp {exp} is about now + 120"
    );

    // Never connected: the token's tracks make it a listener when it opens its stream.
    assert_error(&server.listener(&u).await, 404, "unknown_listener");
    let mut sse = open(&server, &u, Some(&token))
        .await
        .expect("a valid token");
    let (_, listener) = server.listener(&u).await;
    assert_eq!(listener["tracks"], json!([":news", "rooms/1"]));
    let a = server.publish(":news", json!("a")).await;
    server.publish(":other", json!("not mine")).await;
    let b = server.publish("rooms/1", json!("b")).await;
    let events = sse.events(2).await;
    assert_eq!(common::positions(&events), vec![a, b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_tracks_opens_the_stream_of_a_connected_listener() {
    let server = server().await;
    let u = uid("plain");
    let (status, body) = server.api("tokens", json!({"uid": u})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["token"].as_str().expect("token").to_owned();
    let claims = payload(&token);
    assert!(claims.get("tracks").is_none_or(Value::is_null), "{claims}");
    let exp = claims["exp"].as_u64().expect("exp");
    assert!(exp.abs_diff(now() + 3600) <= 5, "an hour by default: {exp}");
    // Unknown listener and no tracks in the token: 404.
    let refused = open(&server, &u, Some(&token)).await.expect_err("unknown");
    assert_error(&refused.answer(), 404, "unknown_listener");
    let empty = sign(
        &json!({"sub": u, "exp": now() + 60, "tracks": []}),
        SECRET,
        Algorithm::HS256,
    );
    let refused = open(&server, &u, Some(&empty)).await.expect_err("unknown");
    assert_error(&refused.answer(), 404, "unknown_listener");

    server.connect(&u, ":data").await;
    let mut sse = open(&server, &u, Some(&token)).await.expect("valid");
    let id = server.publish(":data", json!(1)).await;
    assert_eq!(sse.next_event().await.pos(), id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_by_dolores_token_is_valid() {
    let server = server().await;
    let u = uid("cli");
    // Signed locally with the secret...
    let local = common::command()
        .args(["token", &u, "--track", ":cli", "--token-secret", SECRET])
        .output()
        .await
        .expect("dolores token");
    assert!(local.status.success(), "{local:?}");
    // ...and minted by the server through the api.
    let remote = common::command()
        .args(["token", &u, "--track", ":cli", "--ttl", "5m"])
        .args(["--listen", server.addr(), "--api-key", server.api_key()])
        .output()
        .await
        .expect("dolores token");
    assert!(remote.status.success(), "{remote:?}");
    for output in [local, remote] {
        let token = String::from_utf8(output.stdout).expect("utf-8");
        let token = token.trim();
        assert_eq!(token.split('.').count(), 3, "a JWT: {token:?}");
        assert_eq!(payload(token)["tracks"], json!([":cli"]));
        let mut sse = open(&server, &u, Some(token)).await.expect("valid token");
        let id = server.publish(":cli", json!("hi")).await;
        assert_eq!(sse.next_event().await.pos(), id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_401_with_a_code_for_each_mistake() {
    let server = server().await;
    let u = uid("bad");
    server.connect(&u, ":data").await;
    let valid = |claims: Value| sign(&claims, SECRET, Algorithm::HS256);

    let refused = open(&server, &u, None).await.expect_err("no token");
    assert_error(&refused.answer(), 401, "token_required");

    let expired = valid(json!({"sub": u, "exp": now() - 120}));
    let refused = open(&server, &u, Some(&expired))
        .await
        .expect_err("expired");
    assert_error(&refused.answer(), 401, "token_expired");

    let other = uid("other");
    let for_other = valid(json!({"sub": other, "exp": now() + 60}));
    let refused = open(&server, &u, Some(&for_other))
        .await
        .expect_err("other uid");
    assert_error(&refused.answer(), 401, "token_wrong_listener");

    let cases = [
        (
            "wrong secret",
            sign(
                &json!({"sub": u, "exp": now() + 60}),
                "not-the-secret",
                Algorithm::HS256,
            ),
        ),
        ("garbage", "garbage".to_owned()),
        ("three garbage parts", "a.b.c".to_owned()),
        ("empty", String::new()),
        (
            "HS512",
            sign(
                &json!({"sub": u, "exp": now() + 60}),
                SECRET,
                Algorithm::HS512,
            ),
        ),
        ("no exp", valid(json!({"sub": u}))),
        ("no sub", valid(json!({"exp": now() + 60}))),
        (
            "exp as a string",
            valid(json!({"sub": u, "exp": "tomorrow"})),
        ),
        (
            "a bad track",
            valid(json!({"sub": u, "exp": now() + 60, "tracks": ["a b"]})),
        ),
        (
            "tracks not a list",
            valid(json!({"sub": u, "exp": now() + 60, "tracks": ":data"})),
        ),
        (
            "alg none",
            format!(
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
                valid(json!({"sub": u, "exp": now() + 60}))
                    .split('.')
                    .nth(1)
                    .expect("payload")
            ),
        ),
    ];
    for (what, token) in cases {
        let refused = open(&server, &u, Some(&token)).await.expect_err(what);
        assert_eq!(
            refused.status,
            StatusCode::UNAUTHORIZED,
            "{what}: {:?}",
            refused.body
        );
        assert_error(&refused.answer(), 401, "bad_token");
    }
    // Nothing was connected by the refused tokens.
    let (_, body) = server.listener(&u).await;
    assert_eq!(body["tracks"], json!([":data"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_allows_60_seconds_of_clock_skew() {
    let server = server().await;
    let u = uid("skew");
    server.connect(&u, ":data").await;
    let just_expired = sign(
        &json!({"sub": u, "exp": now() - 20}),
        SECRET,
        Algorithm::HS256,
    );
    open(&server, &u, Some(&just_expired))
        .await
        .expect("within the leeway");
    let long_expired = sign(
        &json!({"sub": u, "exp": now() - 90}),
        SECRET,
        Algorithm::HS256,
    );
    let refused = open(&server, &u, Some(&long_expired))
        .await
        .expect_err("expired");
    assert_error(&refused.answer(), 401, "token_expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_api_still_takes_the_api_key_not_a_token() {
    let server = server().await;
    let u = uid("backend");
    let token = sign(
        &json!({"sub": u, "exp": now() + 60}),
        SECRET,
        Algorithm::HS256,
    );
    let response = server
        .client()
        .post(format!("{}/api/v1/update", server.url()))
        .bearer_auth(&token)
        .json(&json!({"track": ":data", "message": 1}))
        .send()
        .await
        .expect("send");
    assert_error(&common::read_json(response).await, 401, "wrong_api_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_secret_no_token_is_needed_or_checked() {
    let server = Server::start().await;
    let u = uid("open");
    server.connect(&u, ":data").await;
    let mut sse = open(&server, &u, None).await.expect("no token needed");
    let id = server.publish(":data", json!(1)).await;
    assert_eq!(sse.next_event().await.pos(), id);
    drop(sse);
    open(&server, &u, Some("whatever"))
        .await
        .expect("a token is ignored");
}

#[tokio::test]
async fn tokens_are_refused_before_nbf_and_when_they_live_longer_than_a_week() {
    let server = server().await;
    let uid = uid("claims");
    server.connect(&uid, ":data").await;
    let now = now();
    let with = |claims: Value| sign(&claims, SECRET, Algorithm::HS256);
    let refused = [
        (
            json!({"sub": uid, "exp": now + 600, "iat": now, "nbf": now + 300}),
            "token_not_yet_valid",
        ),
        (
            json!({"sub": uid, "exp": now + 8 * 24 * 3600, "iat": now}),
            "token_too_long",
        ),
        // Without iat, the week counts from now.
        (
            json!({"sub": uid, "exp": now + 8 * 24 * 3600}),
            "token_too_long",
        ),
    ];
    for (claims, code) in refused {
        let token = with(claims.clone());
        let answer = open(&server, &uid, Some(&token)).await.expect_err(code);
        assert_error(&answer.answer(), 401, code);
    }
    let fine = with(json!({"sub": uid, "exp": now + 6 * 24 * 3600, "iat": now, "nbf": now - 10}));
    assert!(open(&server, &uid, Some(&fine)).await.is_ok());
}

#[tokio::test]
async fn minted_tokens_carry_iat() {
    let server = server().await;
    let (status, body) = server.api("tokens", json!({"uid": uid("minted")})).await;
    assert_eq!(status, StatusCode::OK);
    let claims = payload(body["token"].as_str().expect("token"));
    let iat = claims["iat"].as_u64().expect("iat");
    assert!(iat.abs_diff(now()) < 60, "{claims}");
}

#[tokio::test]
async fn an_empty_token_secret_is_refused_at_start() {
    let output = common::command()
        .args([
            "serve",
            "--memory",
            "--listen",
            "127.0.0.1:0",
            "--token-secret",
            "",
        ])
        .output()
        .await
        .expect("run");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(said.contains("token_secret is empty"), "{said}");
}

#[tokio::test]
async fn the_bearer_scheme_is_any_letter_case() {
    let server = server().await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let response = server
            .client()
            .get(format!("{}/api/v1/stats", server.url()))
            .header("authorization", format!("{scheme} {}", server.api_key()))
            .send()
            .await
            .expect("stats");
        assert_eq!(response.status(), StatusCode::OK, "{scheme}");
    }
}
