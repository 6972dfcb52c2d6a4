//! Token revocation: `disconnect` of a whole listener revokes the tokens issued before
//! it (and those without `iat`). Used again they get `401 token_revoked` on `/listen`
//! and `/poll`, a close `4401 token_revoked` on `/ws`, and the listener is not
//! re-created; a token minted after the disconnect works. On the embedded, memory and
//! Redis engines, across a restart, and across nodes.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{Server, Sse, WAIT, assert_error, uid, within};
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "revoke-test-secret";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_secs()
}

/// A token signed here with `claims`, as an app holding the secret would.
fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// A token minted by the server (`POST /api/v1/tokens`, with `iat`).
async fn mint(server: &Server, uid: &str, tracks: &[&str]) -> String {
    let (status, body) = server
        .api(
            "tokens",
            json!({"uid": uid, "tracks": tracks, "ttl_seconds": 300}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["token"].as_str().expect("token").to_owned()
}

async fn open(server: &Server, uid: &str, token: &str) -> Result<Sse, common::Refused> {
    Sse::open(&server.listen_url(uid, &format!("?token={token}")), None).await
}

/// Forgets the whole listener, then waits until the clock is past the second of the
/// disconnect: a token minted from then on is issued after it.
async fn forget(server: &Server, uid: &str) {
    let (status, body) = server.api("disconnect", json!({"uid": uid})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = now();
    common::eventually("the next second", WAIT, || async {
        (now() > second).then_some(())
    })
    .await;
}

/// The close code and reason of a WebSocket the server refuses after the upgrade.
async fn ws_close(server: &Server, uid: &str, token: &str) -> (u16, String) {
    let url = format!("ws://{}/ws/{uid}?token={token}", server.addr());
    let (mut socket, _) = within(
        "the websocket handshake",
        WAIT,
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("handshake");
    loop {
        match within("the close frame", WAIT, socket.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error before close: {e}"),
        }
    }
}

/// `token` is refused as revoked on all three listener endpoints, and none of them
/// re-created the listener.
async fn assert_revoked_everywhere(server: &Server, uid: &str, token: &str) {
    let refused = open(server, uid, token)
        .await
        .expect_err("revoked on /listen");
    assert_error(&refused.answer(), 401, "token_revoked");
    let polled = server
        .get(&format!("/poll/{uid}?token={token}&timeout=1"))
        .await;
    assert_error(&polled, 401, "token_revoked");
    assert_eq!(
        ws_close(server, uid, token).await,
        (4401, "token_revoked".to_owned())
    );
    assert_error(&server.listener(uid).await, 404, "unknown_listener");
}

/// What every engine must do; `server` runs with `--token-secret SECRET`.
async fn revocation_holds(server: &Server) {
    // A token with tracks creates the listener; the app then forgets it.
    let u = uid("revoked");
    let old = mint(server, &u, &[":news"]).await;
    let without_iat = sign(&json!({"sub": u, "exp": now() + 300, "tracks": [":news"]}));
    drop(
        open(server, &u, &old)
            .await
            .expect("valid before the disconnect"),
    );
    assert_eq!(server.listener(&u).await.0, StatusCode::OK);
    forget(server, &u).await;
    assert_revoked_everywhere(server, &u, &old).await;
    assert_revoked_everywhere(server, &u, &without_iat).await;

    // Minted after the disconnect: works, and re-creates the listener.
    let fresh = mint(server, &u, &[":news"]).await;
    let mut sse = open(server, &u, &fresh).await.expect("a fresh token");
    let (_, listener) = server.listener(&u).await;
    assert_eq!(listener["tracks"], json!([":news"]));
    let id = server.publish(":news", json!("after")).await;
    assert_eq!(sse.next_event().await.pos(), id);
    // The old one stays revoked while the listener exists again.
    let refused = open(server, &u, &old).await.expect_err("still revoked");
    assert_error(&refused.answer(), 401, "token_revoked");

    // Leaving one track revokes nothing.
    let kept = uid("kept");
    let token = mint(server, &kept, &[":a", ":b"]).await;
    drop(open(server, &kept, &token).await.expect("valid"));
    let (status, body) = server
        .api("disconnect", json!({"uid": kept, "track": ":a"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(
        open(server, &kept, &token)
            .await
            .expect("one track left: not revoked"),
    );
}

fn secured() -> common::ServerConfig {
    Server::config().args(["--token-secret", SECRET])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_listeners_old_tokens_are_revoked_on_the_embedded_store() {
    revocation_holds(&secured().start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_listeners_old_tokens_are_revoked_in_memory() {
    revocation_holds(&secured().memory().start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_listeners_old_tokens_are_revoked_on_redis() {
    revocation_holds(&redis_node(&redis_prefix("engines")).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_survives_a_restart_of_the_embedded_store() {
    let mut server = secured().spawn().await;
    let u = uid("restart");
    let old = mint(&server, &u, &[":news"]).await;
    drop(open(&server, &u, &old).await.expect("valid"));
    forget(&server, &u).await;
    server.terminate().await;
    server.restart().await;
    assert_revoked_everywhere(&server, &u, &old).await;
}

fn redis_prefix(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("dolores-revoke-{test}-{}-{nanos}", std::process::id())
}

fn redis_url() -> String {
    std::env::var("DOLORES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

async fn redis_node(prefix: &str) -> Server {
    let redis = redis_url();
    secured()
        .args(["--redis", &redis, "--redis-prefix", prefix])
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_on_one_node_revokes_on_another() {
    let prefix = redis_prefix("nodes");
    let a = redis_node(&prefix).await;
    let b = redis_node(&prefix).await;
    let u = uid("nodes");
    let old = mint(&b, &u, &[":news"]).await;
    drop(open(&b, &u, &old).await.expect("valid on b"));
    forget(&a, &u).await;
    assert_revoked_everywhere(&b, &u, &old).await;
    let fresh = mint(&a, &u, &[":news"]).await;
    drop(
        open(&b, &u, &fresh)
            .await
            .expect("a fresh token works on b"),
    );
    // Bounded: the revocation key expires with the longest a token lives.
    let ttl = redis_ttl_ms(&format!("{prefix}:r:{u}")).await;
    let week_ms = 7 * 24 * 3600 * 1000;
    assert!(
        ttl > week_ms && ttl <= week_ms + 120_000,
        "revocation ttl {ttl} ms"
    );
}

/// `PTTL key` on the shared Redis.
async fn redis_ttl_ms(key: &str) -> i64 {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("PTTL")
}
