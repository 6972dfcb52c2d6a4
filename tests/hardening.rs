//! What a single misbehaving client must not be able to do to the server, against the
//! real binary: hold a connection with a bare-LF head until a timeout, stream bytes up
//! an SSE stream forever, or make stuck readers keep every message alive.

mod common;

use std::time::Duration;

use common::{Server, WAIT, uid, within};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// A raw socket that has sent `GET /listen/{uid}` (the direct SSE path).
async fn raw_listen(server: &Server, uid: &str) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    tcp.write_all(format!("GET /listen/{uid} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("send");
    tcp
}

#[tokio::test]
async fn a_head_with_bare_lf_line_ends_is_answered_at_once() {
    let server = Server::start().await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\nHost: x\nConnection: close\n\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    // Far below the 30 s a head may take: the empty line ended it.
    within(
        "the answer to a bare-LF head",
        Duration::from_secs(3),
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn bytes_sent_up_an_sse_stream_end_it() {
    let server = Server::start().await;
    let uid = uid("upstream");
    server.connect(&uid, ":u").await;
    let mut tcp = raw_listen(&server, &uid).await;
    let mut head = [0u8; 256];
    let n = within("the stream's head", WAIT, tcp.read(&mut head))
        .await
        .expect("read");
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    tcp.write_all(&[b'x'; 4096]).await.expect("send junk");
    // The server hangs up instead of reading and dropping it for as long as it comes.
    let mut rest = Vec::new();
    within("the server to close", WAIT, tcp.read_to_end(&mut rest))
        .await
        .ok();
    let stats = server.stats().await;
    assert_eq!(stats["streams"]["sse"], 0, "{stats}");
}

#[tokio::test]
async fn stuck_readers_do_not_keep_every_message_alive() {
    // The store keeps 50 messages; four readers that never read must not hold the rest.
    let server = Server::config()
        .memory()
        .args(["--max-stored-messages", "50"])
        .spawn()
        .await;
    let mut sockets = Vec::new();
    for n in 0..4 {
        let uid = uid(&format!("stuck{n}"));
        server.connect(&uid, ":big").await;
        sockets.push(raw_listen(&server, &uid).await); // never read
    }
    common::eventually("4 open streams", WAIT, || async {
        (server.stats().await["streams"]["sse"] == 4).then_some(())
    })
    .await;
    let before = server.rss_kib();
    let big = "x".repeat(60 * 1024);
    for _ in 0..1000 {
        server.publish(":big", json!(big)).await; // 60 MB in all
    }
    let grown_mib = server.rss_kib().saturating_sub(before) / 1024;
    // Each stuck stream keeps at most its bounded queue (1 MiB of messages), what it
    // took from it, and what the kernel holds for its socket.
    assert!(grown_mib < 25, "the server grew by {grown_mib} MiB");
    assert!(server.healthy().await);
}

/// Reads until the server closes the connection; what it sent.
async fn until_closed(tcp: &mut tokio::net::TcpStream, limit: Duration) -> String {
    let mut answer = Vec::new();
    within("the server to close", limit, tcp.read_to_end(&mut answer))
        .await
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_head_that_never_ends_gets_408_after_the_head_timeout() {
    let server = Server::start_args(&["--head-timeout", "500ms"]).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send half a head");
    let answer = until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("head_timeout"), "{answer}");
}

#[tokio::test]
async fn silent_and_idle_kept_alive_connections_are_closed_after_the_head_timeout() {
    let server = Server::start_args(&["--head-timeout", "500ms"]).await;
    // Never sends anything.
    let mut silent = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    // One request answered, then idle on a kept-alive connection.
    let mut idle = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut first = [0u8; 512];
    let n = within("the first answer", WAIT, idle.read(&mut first))
        .await
        .expect("read");
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    let started = std::time::Instant::now();
    assert_eq!(until_closed(&mut silent, Duration::from_secs(5)).await, "");
    until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(server.healthy().await);
}

#[tokio::test]
async fn the_head_timeout_is_read_from_the_environment_and_checked() {
    let server = Server::config()
        .env("DOLORES_HEAD_TIMEOUT", "300ms")
        .spawn()
        .await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\n").await.expect("send");
    let answer = until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let refused = common::command()
        .args(["serve", "--memory", "--head-timeout", "10ms"])
        .output()
        .await
        .expect("run");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("head_timeout must be at least"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// A tmpfs of `mib` MiB mounted on a fresh temp dir, unmounted when dropped. Needs
/// root, which the test machines and CI have.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u32) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (the disk-full test runs as root in CI)"
        );
        Self { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_answers_503_store_full_and_heals_when_space_is_freed() {
    let disk = SmallDisk::mount(8);
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![0u8; 4 * 1024 * 1024]).expect("filler");
    let data = disk.path().join("data");
    let mut server = Server::config()
        .bare(Some(common::API_KEY))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            common::API_KEY,
            "--data",
            data.to_str().expect("utf-8 path"),
        ])
        .spawn()
        .await;
    let uid = uid("diskfull");
    server.connect(&uid, ":full").await;
    let big = "x".repeat(40 * 1024);
    let mut acknowledged = Vec::new();
    let refused = loop {
        let answer = server
            .api("update", json!({"track": ":full", "message": big}))
            .await;
        if answer.0 != 200 {
            break answer;
        }
        acknowledged.push(common::id_of(&answer.1["id"]));
        assert!(acknowledged.len() < 500, "the disk never filled");
    };
    common::assert_error(&refused, 503, "store_full");
    let health = server.get("/healthz").await;
    assert_eq!(health.0, 503, "{:?}", health.1);
    // The contract's shape: a status beside the error.
    assert_eq!(health.1["status"], "store_unavailable", "{:?}", health.1);
    assert_eq!(
        health.1["error"]["code"], "store_unavailable",
        "{:?}",
        health.1
    );

    // Space comes back: the next writes work by themselves, and health with them.
    std::fs::remove_file(&filler).expect("free space");
    let healed = common::eventually("a write to work again", WAIT, || async {
        let answer = server
            .api("update", json!({"track": ":full", "message": big}))
            .await;
        (answer.0 == 200).then(|| common::id_of(&answer.1["id"]))
    })
    .await;
    acknowledged.push(healed);
    assert_eq!(server.get("/healthz").await.0, 200);

    // Nothing acknowledged was lost, across a kill -9 too.
    server.kill9().await;
    server.restart().await;
    let mut stream = server.listen(&uid).await;
    let events = stream.events(acknowledged.len()).await;
    assert_eq!(common::positions(&events), acknowledged);
}

/// Flips bytes all over the store file but its start (bit rot inside a valid file).
fn damage(store: &std::path::Path) {
    let path = store.join("dolores.redb");
    let mut bytes = std::fs::read(&path).expect("read store");
    // Past the first pages (the header, so the file is still taken for a store), every
    // page gets hit.
    for at in (16 * 1024..bytes.len()).step_by(97) {
        bytes[at] ^= 0xFF;
    }
    std::fs::write(&path, bytes).expect("write store");
}

async fn dolores(args: &[&str]) -> std::process::Output {
    within(
        "dolores to finish",
        WAIT,
        common::command()
            .env("RUST_BACKTRACE", "0")
            .args(args)
            .output(),
    )
    .await
    .expect("run dolores")
}

/// How `dolores serve` on a damaged store went: it started (with the child and its
/// first line), or it refused (with its stderr, after checking the exit was an error).
enum Start {
    Serving(tokio::process::Child, String),
    Refused(String),
}

async fn serve_store(dir: &str) -> Start {
    let mut child = common::command()
        .env("RUST_BACKTRACE", "0")
        .args(["serve", "--data", dir, "--api-key", common::API_KEY])
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn dolores");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = within("a first line or an exit", WAIT, lines.next_line())
        .await
        .expect("read stdout");
    match first {
        Some(line) => Start::Serving(child, line),
        None => {
            let output = within("the refused start", WAIT, child.wait_with_output())
                .await
                .expect("wait");
            let said = String::from_utf8_lossy(&output.stderr).into_owned();
            assert!(!output.status.success(), "{said}");
            Start::Refused(said)
        }
    }
}

/// The refusal says what is damaged and what to do.
fn assert_refused_with_what_to_do(said: &str) {
    assert!(
        said.contains("is damaged") && said.contains("dolores repair --data"),
        "{said}"
    );
}

/// A server with 300 messages of ~500 bytes for one listener, stopped by `stop`.
async fn store_with_messages(uid: &str) -> Server {
    let server = Server::spawn().await;
    server.connect(uid, ":rot").await;
    for n in 0..300 {
        server
            .publish(":rot", json!(format!("message {n} {}", "b".repeat(500))))
            .await;
    }
    server
}

#[tokio::test]
async fn a_damaged_store_is_found_by_check_and_refused_at_start() {
    let uid = uid("rot");
    let mut server = store_with_messages(&uid).await;
    assert!(server.terminate().await.success());
    let store = server.store_dir();
    let dir = store.to_str().expect("utf-8 path");

    let check = dolores(&["check", "--data", dir]).await;
    assert!(check.status.success(), "{check:?}");
    assert!(String::from_utf8_lossy(&check.stdout).contains("sound"));

    damage(&store);
    let check = dolores(&["check", "--data", dir]).await;
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        !check.status.success(),
        "check passed a damaged store: {said}"
    );
    assert!(
        said.contains("damaged") && said.contains("dolores.redb"),
        "{said}"
    );

    // Even closed cleanly, a store this damaged is refused as it opens, with the file
    // and what to do: never a panic, never served as if nothing happened.
    match serve_store(dir).await {
        Start::Refused(said) => assert_refused_with_what_to_do(&said),
        Start::Serving(mut child, line) => {
            let _ = child.kill().await;
            panic!("served a store damaged all over: {line}");
        }
    }
}

#[tokio::test]
async fn a_damaged_store_left_by_a_crash_is_checked_as_it_opens() {
    let uid = uid("crash");
    let mut server = store_with_messages(&uid).await;
    server.kill9().await; // not closed cleanly: redb checks (and repairs) as it opens
    let store = server.store_dir();
    damage(&store);
    let dir = store.to_str().expect("utf-8 path");
    match serve_store(dir).await {
        // Repaired to the last sound commit as it opened: a crash's usual outcome.
        Start::Serving(mut child, line) => {
            assert!(line.contains("listening on"), "{line}");
            let _ = child.kill().await;
        }
        Start::Refused(said) => assert_refused_with_what_to_do(&said),
    }
}

/// Flips 16 bytes in the middle of the log's first segment: inside a frame that was
/// synced, with whole frames after it (frames are padded by at most 7 bytes, so 16 in
/// a row always hit one).
fn damage_log(store: &std::path::Path) {
    let path = store.join("log").join("00000000000000000001.seg");
    let mut bytes = std::fs::read(&path).expect("read the segment");
    for byte in &mut bytes[50_000..50_016] {
        *byte ^= 0xFF;
    }
    std::fs::write(&path, bytes).expect("write the segment");
}

#[tokio::test]
async fn a_damaged_log_is_found_by_check_refused_at_start_and_cut_by_repair() {
    let uid = uid("logrot");
    let mut server = store_with_messages(&uid).await;
    assert!(server.terminate().await.success());
    let store = server.store_dir();
    let dir = store.to_str().expect("utf-8 path");
    damage_log(&store);

    let check = dolores(&["check", "--data", dir]).await;
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        !check.status.success(),
        "check passed a damaged log: {said}"
    );
    assert!(
        said.contains("is damaged") && said.contains(".seg"),
        "{said}"
    );
    match serve_store(dir).await {
        Start::Refused(said) => assert_refused_with_what_to_do(&said),
        Start::Serving(mut child, line) => {
            let _ = child.kill().await;
            panic!("served a damaged log: {line}");
        }
    }

    // Repair cuts the log at the damage: what came before it is kept, in order.
    let repair = dolores(&["repair", "--data", dir]).await;
    assert!(repair.status.success(), "{repair:?}");
    assert!(String::from_utf8_lossy(&repair.stdout).contains("repaired"));
    let check = dolores(&["check", "--data", dir]).await;
    assert!(check.status.success(), "{check:?}");
    server.restart().await;
    let kept = server.stats().await["messages_stored"]
        .as_u64()
        .expect("messages_stored");
    assert!((1..300).contains(&kept), "kept {kept} of 300");
    let mut stream = server.listen(&uid).await;
    let events = stream.events(kept as usize).await;
    assert_eq!(common::positions(&events), (1..=kept).collect::<Vec<u64>>());
}

#[tokio::test]
async fn an_empty_store_file_is_an_error_not_a_new_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("dolores.redb"), b"").expect("empty file");
    let data = dir.path().to_str().expect("utf-8 path");
    let serve = dolores(&[
        "serve",
        "--data",
        data,
        "--api-key",
        "k",
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let said = String::from_utf8_lossy(&serve.stderr);
    assert!(!serve.status.success(), "{said}");
    assert!(said.contains("empty, 0 bytes"), "{said}");
}
