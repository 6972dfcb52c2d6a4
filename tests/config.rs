//! Settings from a `dolores.toml` (`--config`) and from `DOLORES_*` variables: honoured,
//! in the order flag > environment > file > default, and refused clearly when wrong.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Server, WAIT, assert_error, uid, within};
use reqwest::StatusCode;
use serde_json::json;

/// Writes `text` as a dolores.toml in a fresh temp dir.
fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dolores.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

/// A JSON string message whose serialized form is exactly `bytes` long.
fn message_of(bytes: usize) -> serde_json::Value {
    json!("m".repeat(bytes - 2))
}

async fn publish_status(server: &Server, bytes: usize) -> StatusCode {
    server
        .api(
            "update",
            json!({"track": ":t", "message": message_of(bytes)}),
        )
        .await
        .0
}

/// Counts heartbeat comments on an idle stream for `window`.
async fn heartbeats_within(server: &Server, window: Duration) -> usize {
    let u = uid("beat");
    server.connect(&u, ":beat").await;
    let mut sse = server.listen(&u).await;
    let deadline = tokio::time::Instant::now() + window;
    let mut beats = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match sse.try_next_block(left).await {
            Some(Some(block)) => {
                beats += block.comments.iter().filter(|c| *c == "heartbeat").count()
            }
            Some(None) => panic!("the stream ended"),
            None => return beats,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_is_honoured() {
    let (_dir, path) = config_file(
        r#"
listen = "127.0.0.1:0"
memory = true
api_key = "key-from-file"
token_secret = "secret-from-file"
heartbeat = "200ms"
retention = "1h"
max_stored_messages = 3
listener_ttl = "2h"
max_message_bytes = 100
cors_origins = ["https://app.example"]
"#,
    );
    let server = Server::config()
        .bare(Some("key-from-file"))
        .args(["--config".to_owned(), path.display().to_string()])
        .spawn()
        .await;
    let stats = server.stats().await;
    assert_eq!(stats["engine"], "memory", "{stats}");
    assert!(
        server.stdout_lines()[0].contains("127.0.0.1:"),
        "{:?}",
        server.stdout_lines()
    );

    // max_message_bytes
    assert_eq!(publish_status(&server, 100).await, StatusCode::OK);
    assert_eq!(
        publish_status(&server, 101).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // max_stored_messages
    for i in 0..5 {
        server.publish(":t", json!(i)).await;
    }
    assert_eq!(server.stats().await["messages_stored"], 3);
    // token_secret: listeners need a token.
    let u = uid("conf");
    server.connect(&u, ":t").await;
    let refused = common::Sse::open(&server.listen_url(&u, ""), None)
        .await
        .expect_err("a token is required");
    assert_error(&refused.answer(), 401, "token_required");
    let (status, body) = server.api("tokens", json!({"uid": u})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_heartbeat_and_data_dir_are_honoured() {
    let (_dir, path) = config_file("heartbeat = \"200ms\"\ndata = \"from-file-data\"\n");
    let server = Server::config()
        .bare(Some("k"))
        .args(["--listen", "127.0.0.1:0", "--api-key", "k", "--config"])
        .args([path.display().to_string()])
        .spawn()
        .await;
    assert!(heartbeats_within(&server, Duration::from_millis(1500)).await >= 3);
    // A relative data dir is relative to the working directory.
    assert!(
        server
            .work_dir()
            .join("from-file-data")
            .join("dolores.redb")
            .exists()
    );
    assert_eq!(server.stats().await["engine"], "embedded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dolores_max_message_bytes_from_the_environment_is_honoured() {
    let server = Server::config()
        .env("DOLORES_MAX_MESSAGE_BYTES", "50")
        .spawn()
        .await;
    assert_eq!(publish_status(&server, 50).await, StatusCode::OK);
    let answer = server
        .api("update", json!({"track": ":t", "message": message_of(51)}))
        .await;
    assert_error(&answer, 413, "message_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_beats_the_environment_which_beats_the_file() {
    let (_dir, path) = config_file("max_message_bytes = 100\n");
    let config = path.display().to_string();
    let file_only = Server::config().args(["--config", &config]).spawn().await;
    assert_eq!(
        publish_status(&file_only, 150).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    let env_over_file = Server::config()
        .args(["--config", &config])
        .env("DOLORES_MAX_MESSAGE_BYTES", "200")
        .spawn()
        .await;
    assert_eq!(publish_status(&env_over_file, 150).await, StatusCode::OK);
    assert_eq!(
        publish_status(&env_over_file, 250).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    let flag_over_env = Server::config()
        .args(["--config", &config, "--max-message-bytes", "300"])
        .env("DOLORES_MAX_MESSAGE_BYTES", "200")
        .spawn()
        .await;
    assert_eq!(publish_status(&flag_over_env, 250).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_setting_can_come_from_the_environment() {
    let server = Server::config()
        .bare(Some("key-from-env"))
        .env("DOLORES_LISTEN", "127.0.0.1:0")
        .env("DOLORES_MEMORY", "true")
        .env("DOLORES_API_KEY", "key-from-env")
        .env("DOLORES_HEARTBEAT", "200ms")
        .env("DOLORES_MAX_STORED_MESSAGES", "2")
        .env("DOLORES_RETENTION", "1h")
        .env("DOLORES_LISTENER_TTL", "1h")
        .env(
            "DOLORES_CORS_ORIGINS",
            "https://a.example,https://b.example",
        )
        .spawn()
        .await;
    assert_eq!(server.stats().await["engine"], "memory");
    for i in 0..4 {
        server.publish(":t", json!(i)).await;
    }
    assert_eq!(server.stats().await["messages_stored"], 2);
    assert!(heartbeats_within(&server, Duration::from_millis(1500)).await >= 3);

    let with_secret = Server::config()
        .env("DOLORES_TOKEN_SECRET", "env-secret")
        .spawn()
        .await;
    let (status, body) = with_secret.api("tokens", json!({"uid": "abcdefgh"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Runs `dolores serve` with `args` and expects it to refuse to start.
async fn refused(args: &[&str]) -> String {
    let output = within(
        "serve to refuse",
        WAIT,
        common::command()
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--memory", "--api-key", "k"])
            .args(args)
            .output(),
    )
    .await
    .expect("run");
    assert!(!output.status.success(), "{output:?}");
    assert!(output.stdout.is_empty(), "it did not start: {output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_with_a_clear_message() {
    let (_dir, unknown) = config_file("hartbeat = \"5s\"\n");
    let stderr = refused(&["--config", unknown.to_str().expect("utf-8")]).await;
    assert!(stderr.contains("hartbeat"), "{stderr}");

    let (_dir, bad_duration) = config_file("retention = \"a while\"\n");
    let stderr = refused(&["--config", bad_duration.to_str().expect("utf-8")]).await;
    assert!(stderr.contains("retention"), "{stderr}");

    let (_dir, bad_type) = config_file("max_stored_messages = \"many\"\n");
    let stderr = refused(&["--config", bad_type.to_str().expect("utf-8")]).await;
    assert!(stderr.contains("max_stored_messages"), "{stderr}");

    let stderr = refused(&["--config", "/nonexistent/dolores.toml"]).await;
    assert!(stderr.contains("/nonexistent/dolores.toml"), "{stderr}");

    let stderr = refused(&["--max-message-bytes", "1"]).await;
    assert!(stderr.contains("max_message_bytes"), "{stderr}");
    let stderr = refused(&["--heartbeat", "1ms"]).await;
    assert!(stderr.contains("heartbeat"), "{stderr}");
    let stderr = refused(&["--max-stored-messages", "0"]).await;
    assert!(stderr.contains("max_stored_messages"), "{stderr}");
    let stderr = refused(&["--retention", "soon"]).await;
    assert!(stderr.contains("retention"), "{stderr}");
}

/// Runs `dolores serve ARGS…` (nothing added) and expects it to refuse to start with
/// one line on stderr; returns that line.
async fn refused_in_one_line<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    dir: &std::path::Path,
) -> String {
    let output = within(
        "serve to refuse",
        WAIT,
        common::command()
            .current_dir(dir)
            .arg("serve")
            .args(args)
            .output(),
    )
    .await
    .expect("run");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(output.stdout.is_empty(), "it did not start: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("dolores: "), "{stderr:?}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cors_origin_without_a_scheme_is_refused_and_star_is_allowed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = ["--listen", "127.0.0.1:0", "--memory", "--api-key", "k"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| (*s).to_owned()).collect()
    };
    let line = refused_in_one_line(&with(&["--cors-origins", "127.0.0.1:8081"]), dir.path()).await;
    assert!(line.contains("write it as http://127.0.0.1:8081"), "{line}");
    let line = refused_in_one_line(
        &with(&["--cors-origins", "https://a.example,https://b.example/app"]),
        dir.path(),
    )
    .await;
    assert!(line.contains("write it as https://b.example"), "{line}");
    // From the file too.
    let (_file_dir, path) = config_file("cors_origins = [\"app.example\"]\n");
    let line = refused_in_one_line(
        &with(&["--config", path.to_str().expect("utf-8")]),
        dir.path(),
    )
    .await;
    assert!(line.contains("write it as http://app.example"), "{line}");

    // `*` and real origins (a trailing slash is forgiven) start.
    let server = Server::config()
        .memory()
        .args(["--cors-origins", "*"])
        .spawn()
        .await;
    assert_eq!(server.stats().await["engine"], "memory");
    let server = Server::config()
        .memory()
        .args([
            "--cors-origins",
            "http://127.0.0.1:8081,https://app.example/",
        ])
        .spawn()
        .await;
    assert_eq!(server.stats().await["engine"], "memory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_alone_as_listen_is_refused_with_the_address_form() {
    let dir = tempfile::tempdir().expect("temp dir");
    let line = refused_in_one_line(
        &["--listen", "9000", "--memory", "--api-key", "k"],
        dir.path(),
    )
    .await;
    assert!(line.contains("write it as 127.0.0.1:9000"), "{line}");
    let line = refused_in_one_line(
        &[
            "--listen",
            "http://127.0.0.1:9000",
            "--memory",
            "--api-key",
            "k",
        ],
        dir.path(),
    )
    .await;
    assert!(line.contains("like 127.0.0.1:8007"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").expect("write");
    let file = file.to_str().expect("utf-8");
    let line = refused_in_one_line(
        &["--listen", "127.0.0.1:0", "--data", file, "--api-key", "k"],
        dir.path(),
    )
    .await;
    assert!(line.contains(file) && line.contains("is a file"), "{line}");
    // Without an api key too (the key would be generated into the data dir).
    let line = refused_in_one_line(&["--listen", "127.0.0.1:0", "--data", file], dir.path()).await;
    assert!(line.contains("is a file"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_their_cause_once_on_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = ["--listen", "127.0.0.1:0", "--memory", "--api-key", "k"];
    let line = refused_in_one_line(
        &[&base[..], &["--config", "/nonexistent/dolores.toml"]].concat(),
        dir.path(),
    )
    .await;
    assert!(
        line.contains("cannot read /nonexistent/dolores.toml"),
        "{line}"
    );
    assert_eq!(line.matches("os error 2").count(), 1, "{line}");
    assert_eq!(line.matches("No such file").count(), 1, "{line}");

    // toml quotes the file over several lines; the error says the line instead.
    let (_file_dir, path) = config_file("heartbeat = \"5s\"\nhartbeat = \"5s\"\n");
    let config = path.to_str().expect("utf-8");
    let line = refused_in_one_line(&[&base[..], &["--config", config]].concat(), dir.path()).await;
    assert!(
        line.contains(&format!(
            "{config}: line 2, `hartbeat = \"5s\"`: unknown field `hartbeat`"
        )),
        "{line}"
    );
}

/// A webhook receiver that answers 200 to every request and hands over each request's
/// `Dolores-Signature` and body.
async fn webhook_receiver() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut bytes = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n");
                    if let Some(end) = head_end {
                        let head = String::from_utf8_lossy(&bytes[..end]).to_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if bytes.len() >= end + 4 + length {
                            let signature = head
                                .lines()
                                .find_map(|l| l.strip_prefix("dolores-signature:"))
                                .unwrap_or_default()
                                .trim()
                                .to_owned();
                            let body = String::from_utf8_lossy(&bytes[end + 4..end + 4 + length])
                                .into_owned();
                            let _ = tx.send((signature, body));
                            bytes.drain(..end + 4 + length);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if socket.write_all(ok).await.is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => bytes.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (url, rx)
}

/// Opens a stream for a new listener on a new track and checks the two webhooks the
/// server sends (`listener.online`, `track.occupied`, in either order: they are in
/// different lanes) against `secret`.
async fn webhooks_are_signed_with(
    server: &Server,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    secret: &str,
) {
    use hmac::Mac;
    let u = uid("hooked");
    let track = format!(":{u}");
    server.connect(&u, &track).await;
    let _sse = server.listen(&u).await;
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let (signature, body) = within("a webhook", WAIT, events.recv())
            .await
            .expect("a webhook");
        // The receiver is shared: the previous server may still report its own
        // listener going away.
        if !body.contains(&u) {
            continue;
        }
        let event: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            event["data"].as_object().map(|d| d.len()),
            Some(1),
            "{body}"
        );
        assert!(body.contains(&u), "{body}");
        kinds.push(event["type"].as_str().unwrap_or_default().to_owned());
        let (t, v1) = signature
            .strip_prefix("t=")
            .and_then(|rest| rest.split_once(",v1="))
            .unwrap_or_else(|| panic!("signature {signature:?}"));
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
        mac.update(format!("{t}.{body}").as_bytes());
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(v1, expected, "{body}");
    }
    kinds.sort();
    assert_eq!(kinds, ["listener.online", "track.occupied"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_settings_come_from_flags_the_environment_and_the_file() {
    let (url, mut events) = webhook_receiver().await;
    let by_flag = Server::config()
        .memory()
        .args(["--webhook-url", &url, "--webhook-secret", "flag-secret"])
        .args(["--webhook-timeout", "5s", "--webhook-max-backoff", "1s"])
        .args(["--webhook-outbox-max", "10"])
        .start()
        .await;
    webhooks_are_signed_with(&by_flag, &mut events, "flag-secret").await;
    drop(by_flag);

    let by_env = Server::config()
        .memory()
        .env("DOLORES_WEBHOOK_URL", &url)
        .env("DOLORES_WEBHOOK_SECRET", "env-secret")
        .env("DOLORES_WEBHOOK_TIMEOUT", "5s")
        .env("DOLORES_WEBHOOK_MAX_BACKOFF", "1s")
        .env("DOLORES_WEBHOOK_OUTBOX_MAX", "10")
        .spawn()
        .await;
    webhooks_are_signed_with(&by_env, &mut events, "env-secret").await;
    drop(by_env);

    let (_dir, path) = config_file(&format!(
        "webhook_url = \"{url}\"\nwebhook_secret = \"file-secret\"\nwebhook_timeout = \"5s\"\n\
         webhook_max_backoff = \"1s\"\nwebhook_outbox_max = 10\n"
    ));
    let by_file = Server::config()
        .memory()
        .args(["--config".to_owned(), path.display().to_string()])
        .start()
        .await;
    webhooks_are_signed_with(&by_file, &mut events, "file-secret").await;

    // Each spelling of each is read: a bad value is refused by name.
    let (_dir, zero) = config_file("webhook_outbox_max = 0\n");
    let stderr = refused(&["--config", zero.to_str().expect("utf-8")]).await;
    assert!(stderr.contains("webhook_outbox_max"), "{stderr}");
    let stderr = refused(&["--webhook-timeout", "1ms"]).await;
    assert!(stderr.contains("webhook_timeout"), "{stderr}");
    let stderr = refused(&["--webhook-max-backoff", "1ms"]).await;
    assert!(stderr.contains("webhook_max_backoff"), "{stderr}");
    let stderr = refused(&["--webhook-url", "ftp://app.example/hook"]).await;
    assert!(stderr.contains("webhook_url"), "{stderr}");
    let stderr = refused(&[
        "--webhook-url",
        "http://app.example/hook",
        "--webhook-secret",
        " ",
    ])
    .await;
    assert!(stderr.contains("webhook_secret is empty"), "{stderr}");
}
