//! `dolores bench`, the load generator, run as the real binary against a real server
//! (and against a tiny stand-in for a foreign push server): its numbers add up, it
//! finds nothing wrong where nothing is, it counts what did not come as lost, and it
//! refuses any target that is not loopback.

mod common;

use std::collections::HashMap;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, within};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Longest one bench run may take in these tests (each passes a shorter --timeout).
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Runs `dolores bench ARGS…` to the end.
async fn bench(args: &[&str]) -> Output {
    within(
        &format!("dolores bench {args:?}"),
        RUN_LIMIT,
        common::command().arg("bench").args(args).output(),
    )
    .await
    .expect("run dolores bench")
}

/// Runs a bench that must succeed with `--json`; returns its report.
async fn bench_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let output = bench(&all).await;
    assert!(
        output.status.success(),
        "dolores bench {all:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON ({e}): {stdout}"))
}

fn n(report: &Value, pointer: &str) -> u64 {
    report
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} in {report}"))
}

fn f(report: &Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} in {report}"))
}

/// Nothing lost, doubled, misrouted or out of order, and the numbers are sane.
#[track_caller]
fn assert_clean(report: &Value, listeners: u64, expected: u64) {
    for key in [
        "loss",
        "duplicates",
        "misroutes",
        "reordered",
        "resets",
        "drops",
    ] {
        assert_eq!(n(report, &format!("/{key}")), 0, "{key}: {report}");
    }
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    assert_eq!(n(report, "/connections/made"), listeners, "{report}");
    assert_eq!(n(report, "/connections/failed"), 0, "{report}");
    assert_eq!(n(report, "/publish/failed"), 0, "{report}");
    assert_eq!(n(report, "/deliveries/expected"), expected, "{report}");
    assert_eq!(n(report, "/deliveries/unique"), expected, "{report}");
    assert_eq!(n(report, "/deliveries/received"), expected, "{report}");
    assert_eq!(n(report, "/latency_ms/samples"), expected, "{report}");
    let (p50, p99, max) = (
        f(report, "/latency_ms/p50"),
        f(report, "/latency_ms/p99"),
        f(report, "/latency_ms/max"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{report}");
    assert!(max < 30_000.0, "{report}");
    assert!(f(report, "/publish/per_second") > 0.0, "{report}");
    assert!(f(report, "/deliveries/per_second") > 0.0, "{report}");
    assert!(f(report, "/connections/seconds") >= 0.0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_listeners_get_exactly_their_messages_and_runs_do_not_collide() {
    let server = Server::config().memory().spawn().await;
    let args = [
        "--server",
        &server.url(),
        "--api-key",
        server.api_key(),
        "--listeners",
        "50",
        "--tracks",
        "2",
        "--messages",
        "200",
        "--publishers",
        "4",
        "--timeout",
        "20s",
    ];
    let first = bench_json(&args).await;
    // 100 messages on each track, 25 listeners on each.
    assert_clean(&first, 50, 200 * 25);
    assert_eq!(n(&first, "/publish/ok"), 200);
    assert_eq!(n(&first, "/publish/requests"), 200);
    assert_eq!(n(&first, "/setup/subscriptions"), 50);
    assert_eq!(first["transport"], "sse");
    assert_eq!(first["source_addrs"].as_array().map(Vec::len), Some(4));

    // Again against the same server: new uids and tracks, so the same clean count.
    let second = bench_json(&args).await;
    assert_ne!(first["run"], second["run"]);
    assert_clean(&second, 50, 200 * 25);

    // Each run forgets its listeners at the end, unless told to keep them.
    assert_eq!(server.stats().await["listeners"], 0);
    let mut keep = args.to_vec();
    assert_eq!(keep[8], "--messages");
    keep[9] = "10";
    keep.push("--keep-listeners");
    // And with the server's CPU time read per phase from /proc.
    let pid = server.pid().to_string();
    keep.extend(["--server-pid", &pid]);
    let kept = bench_json(&keep).await;
    assert_clean(&kept, 50, 10 * 25);
    assert_eq!(server.stats().await["listeners"], 50);
    let cpu = &kept["server_cpu"];
    assert_eq!(cpu["pids"], serde_json::json!([server.pid()]), "{kept}");
    let phases = f(&kept, "/server_cpu/subscribe_s")
        + f(&kept, "/server_cpu/open_s")
        + f(&kept, "/server_cpu/publish_deliver_s");
    assert!(
        (phases - f(&kept, "/server_cpu/total_s")).abs() < 1e-6,
        "{kept}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_long_poll_listeners_with_batches_and_a_rate() {
    // No --api-key: the bench finds the generated one in the data dir.
    let server = Server::config().no_api_key().spawn().await;
    let data = server.store_dir();
    let data = data.to_str().expect("utf-8 path");
    for transport in ["ws", "poll"] {
        let report = bench_json(&[
            "--server",
            &server.url(),
            "--data",
            data,
            "--transport",
            transport,
            "--listeners",
            "20",
            "--tracks",
            "3",
            "--tracks-per-listener",
            "2",
            "--messages",
            "120",
            "--publishers",
            "2",
            "--batch",
            "10",
            "--timeout",
            "20s",
        ])
        .await;
        // Each listener is on 2 of the 3 tracks, which get 40 messages each.
        assert_clean(&report, 20, 20 * 80);
        assert_eq!(n(&report, "/publish/requests"), 12, "{report}");
        assert_eq!(report["transport"], transport);
    }

    let began = Instant::now();
    let report = bench_json(&[
        "--server",
        &server.url(),
        "--data",
        data,
        "--listeners",
        "10",
        "--messages",
        "50",
        "--rate",
        "100",
        "--payload-bytes",
        "500",
        "--timeout",
        "20s",
    ])
    .await;
    assert_clean(&report, 10, 500);
    // 50 messages at 100/s take about half a second.
    let publish = f(&report, "/publish/seconds");
    assert!((0.4..5.0).contains(&publish), "{report}");
    assert!(began.elapsed() >= Duration::from_millis(450));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_pid_that_is_not_running_is_refused_before_the_run() {
    let server = Server::config().memory().spawn().await;
    let output = bench(&[
        "--server",
        &server.url(),
        "--api-key",
        server.api_key(),
        "--server-pid",
        "4000000000",
        "--timeout",
        "5s",
    ])
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stderr.contains("--server-pid 4000000000: no such process"),
        "{stderr}"
    );
    assert_eq!(
        server.stats().await["listeners"],
        0,
        "nothing was subscribed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_off_loopback_are_refused_before_anything_is_sent() {
    for args in [
        &["--server", "http://10.0.0.1:8007"][..],
        &["--server", "192.168.1.10:8007"],
        &["--server", "http://example.com"],
        &[
            "--server",
            "http://127.0.0.1:9",
            "--server",
            "http://[2001:db8::1]:80",
        ],
        &[
            "--server",
            "http://127.0.0.1:9",
            "--no-connect",
            "--listen-url",
            "http://172.16.0.1/sub/{track}",
        ],
        &[
            "--server",
            "http://127.0.0.1:9",
            "--no-connect",
            "--listen-url",
            "http://127.0.0.1:9/sub/{track}",
            "--publish-url",
            "http://8.8.8.8/pub/{track}",
        ],
    ] {
        let mut all = args.to_vec();
        all.extend(["--api-key", "k", "--timeout", "5s"]);
        let output = bench(&all).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{all:?}: {output:?}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
        assert!(
            stderr.starts_with("dolores: refusing to target "),
            "{stderr}"
        );
        assert!(stderr.contains("only loads loopback"), "{stderr}");
        assert!(output.stdout.is_empty(), "{output:?}");
    }
}

/// A stand-in for a foreign push server, Nchan-like: `GET /sub/{channel}` is an
/// event stream (read to the close, no chunking), `POST /pub/{channel}` sends its body
/// as one `data:` line to the channel's subscribers — unless `deliver` is false.
async fn foreign_server(deliver: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    type Subscribers = Arc<Mutex<HashMap<String, Vec<mpsc::UnboundedSender<Vec<u8>>>>>>;
    let subscribers: Subscribers = Arc::default();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let subscribers = subscribers.clone();
            tokio::spawn(async move {
                let _ = serve_foreign(stream, subscribers, deliver).await;
            });
        }
    });

    async fn serve_foreign(
        mut stream: TcpStream,
        subscribers: Subscribers,
        deliver: bool,
    ) -> std::io::Result<()> {
        let mut buffer = Vec::new();
        loop {
            let head_end = loop {
                if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end;
                }
                let mut chunk = [0u8; 4096];
                let read = stream.read(&mut chunk).await?;
                if read == 0 {
                    return Ok(());
                }
                buffer.extend_from_slice(&chunk[..read]);
            };
            let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
            buffer.drain(..head_end + 4);
            let mut words = head.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            if let (Some(channel), "GET") = (path.strip_prefix("/sub/"), method) {
                let (tx, mut rx) = mpsc::unbounded_channel();
                subscribers
                    .lock()
                    .expect("lock")
                    .entry(channel.to_owned())
                    .or_default()
                    .push(tx);
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n: hi\n\n")
                    .await?;
                while let Some(message) = rx.recv().await {
                    stream.write_all(&message).await?;
                }
                return Ok(());
            }
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buffer.len() < length {
                let mut chunk = [0u8; 4096];
                let read = stream.read(&mut chunk).await?;
                if read == 0 {
                    return Ok(());
                }
                buffer.extend_from_slice(&chunk[..read]);
            }
            let body: Vec<u8> = buffer.drain(..length).collect();
            if let (Some(channel), "POST") = (path.strip_prefix("/pub/"), method) {
                if deliver {
                    let mut event = b"data: ".to_vec();
                    event.extend_from_slice(&body);
                    event.extend_from_slice(b"\n\n");
                    let mut subscribers = subscribers.lock().expect("lock");
                    if let Some(list) = subscribers.get_mut(channel) {
                        list.retain(|tx| tx.send(event.clone()).is_ok());
                    }
                }
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await?;
            } else {
                stream
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await?;
            }
        }
    }

    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_server_is_driven_through_templates() {
    let foreign = foreign_server(true).await;
    let report = bench_json(&[
        "--server",
        &foreign,
        "--no-connect",
        "--listen-url",
        "{server}/sub/{track}",
        "--publish-url",
        "{server}/pub/{track}",
        "--publish-body",
        "{message}",
        "--settle",
        "100ms",
        "--listeners",
        "30",
        "--tracks",
        "3",
        "--messages",
        "90",
        "--publishers",
        "3",
        "--timeout",
        "20s",
    ])
    .await;
    // 30 messages per track, 10 listeners per track.
    assert_clean(&report, 30, 30 * 30);
    assert_eq!(report["setup"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_does_not_come_by_the_timeout_is_counted_as_lost() {
    // This one takes every publish and delivers nothing.
    let foreign = foreign_server(false).await;
    let began = Instant::now();
    let output = bench(&[
        "--server",
        &foreign,
        "--no-connect",
        "--listen-url",
        "{server}/sub/{track}",
        "--publish-url",
        "{server}/pub/{track}",
        "--settle",
        "0s",
        "--listeners",
        "5",
        "--messages",
        "20",
        "--timeout",
        "2s",
        "--json",
        "--strict",
    ])
    .await;
    let took = began.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    // --strict: the report is printed, then the exit code says it was not clean.
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("the JSON report");
    assert_eq!(report["timed_out"], true, "{report}");
    assert_eq!(report["complete"], false, "{report}");
    assert_eq!(n(&report, "/publish/ok"), 20, "{report}");
    assert_eq!(n(&report, "/deliveries/expected"), 100, "{report}");
    assert_eq!(n(&report, "/deliveries/unique"), 0, "{report}");
    assert_eq!(n(&report, "/loss"), 100, "{report}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not clean"), "{stderr}");
}
