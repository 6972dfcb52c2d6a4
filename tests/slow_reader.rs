//! A listener that opens its stream and never reads must cost the server little: the
//! publishers keep being answered quickly, the other listeners keep getting everything,
//! the server's memory stays bounded — and when the slow reader finally reads, it gets
//! everything it missed in order, or a `reset` where the store no longer has it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Event, Server, SseParser, positions, to_event, uid};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// `/listen/{uid}` over a raw socket with a small receive buffer, read only when the
/// test says so.
struct RawSse {
    stream: TcpStream,
    parser: SseParser,
    head: Vec<u8>,
    in_body: bool,
}

impl RawSse {
    /// Connects and sends the request; reads nothing.
    async fn open_without_reading(server: &Server, uid: &str) -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .set_recv_buffer_size(4096)
            .expect("small receive buffer");
        let mut stream = socket
            .connect(server.addr().parse().expect("addr"))
            .await
            .expect("connect");
        // HTTP/1.0: the body is not chunked, so what we read later is plain event stream.
        let request = format!(
            "GET /listen/{uid} HTTP/1.0\r\nHost: {}\r\n\r\n",
            server.addr()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
        Self {
            stream,
            parser: SseParser::default(),
            head: Vec::new(),
            in_body: false,
        }
    }

    /// Reads until `done(events so far)` holds; panics if the stream ends or `limit`
    /// passes first.
    async fn read_until(&mut self, limit: Duration, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut events = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        while !done(&events) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let n = match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => n,
                other => panic!(
                    "read {} events (last {:?}), then {other:?}",
                    events.len(),
                    events.last()
                ),
            };
            let mut bytes = &buf[..n];
            let rest;
            if !self.in_body {
                self.head.extend_from_slice(bytes);
                let Some(end) = self.head.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let status = String::from_utf8_lossy(&self.head[..end]).to_string();
                assert!(
                    status.starts_with("HTTP/1.0 200") || status.starts_with("HTTP/1.1 200"),
                    "{status}"
                );
                rest = self.head.split_off(end + 4);
                self.in_body = true;
                bytes = &rest;
            }
            events.extend(self.parser.feed(bytes).into_iter().filter_map(to_event));
        }
        events
    }
}

/// Samples the server's resident memory every 50 ms; returns the highest, in KiB.
fn sample_rss(server: &Server, stop: Arc<AtomicU64>) -> tokio::task::JoinHandle<u64> {
    let pid = server.pid();
    tokio::spawn(async move {
        let mut max = 0;
        while stop.load(Ordering::SeqCst) == 0 {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
            {
                max = max.max(kib);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        max
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_slows_no_one_and_catches_up_later() {
    let server = Arc::new(Server::spawn().await);
    let (slow, fast) = (uid("slow"), uid("fast"));
    server.connect(&slow, ":data").await;
    server.connect(&fast, ":data").await;
    let mut slow_stream = RawSse::open_without_reading(&server, &slow).await;
    let mut fast_sse = server.listen(&fast).await;
    common::eventually("both streams open", common::WAIT, || async {
        let (_, a) = server.listener(&slow).await;
        let (_, b) = server.listener(&fast).await;
        (a["online"] == 1 && b["online"] == 1).then_some(())
    })
    .await;

    let stop = Arc::new(AtomicU64::new(0));
    let rss = sample_rss(&server, stop.clone());
    // 4 publishers × 30 rounds × (a batch of 50 + one single) of ~3 KB messages: ~18 MB,
    // far more than the socket buffers and the slow stream's queue hold.
    let padding = "x".repeat(3000);
    let (publishers, rounds, batch) = (4, 30, 50);
    let total = publishers * rounds * (batch + 1);
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let server = server.clone();
        let padding = padding.clone();
        tasks.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut ids = Vec::new();
            for r in 0..rounds {
                let updates: Vec<(&str, Value)> = (0..batch)
                    .map(|i| (":data", json!({"p": p, "r": r, "i": i, "pad": padding})))
                    .collect();
                ids.extend(server.publish_batch(&updates).await);
                let started = Instant::now();
                ids.push(
                    server
                        .publish(":data", json!({"p": p, "r": r, "pad": padding}))
                        .await,
                );
                slowest = slowest.max(started.elapsed());
            }
            (ids, slowest)
        }));
    }
    // The fast listener reads along.
    let fast_events = common::within(
        "the fast listener",
        Duration::from_secs(60),
        fast_sse.events(total),
    )
    .await;
    let mut acked = Vec::new();
    let mut slowest = Duration::ZERO;
    for task in tasks {
        let (ids, s) = task.await.expect("publisher");
        acked.extend(ids);
        slowest = slowest.max(s);
    }
    acked.sort_unstable();
    assert_eq!(
        positions(&fast_events),
        acked,
        "the fast listener got everything, in order"
    );
    assert!(
        slowest < Duration::from_secs(5),
        "a single publish took {slowest:?} while a reader did not read"
    );
    stop.store(1, Ordering::SeqCst);
    let max_rss = rss.await.expect("sampler");
    eprintln!("slowest single publish {slowest:?}, highest RSS {max_rss} KiB");
    assert!(max_rss < 200 * 1024, "the server grew to {max_rss} KiB");
    assert!(server.healthy().await);

    // The slow reader finally reads: everything, in order, no duplicate, no reset.
    let slow_events = slow_stream
        .read_until(Duration::from_secs(60), |events| events.len() >= total)
        .await;
    assert!(
        slow_events.iter().all(|e| !e.is_reset()),
        "nothing was trimmed"
    );
    assert_eq!(positions(&slow_events), acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_reader_whose_messages_were_trimmed_gets_a_reset_not_a_gap() {
    let server = Server::config()
        .memory()
        .args(["--max-stored-messages", "300"])
        .start()
        .await;
    let slow = uid("lagging");
    server.connect(&slow, ":data").await;
    let mut slow_stream = RawSse::open_without_reading(&server, &slow).await;
    common::eventually("the stream open", common::WAIT, || async {
        (server.listener(&slow).await.1["online"] == 1).then_some(())
    })
    .await;
    let padding = "y".repeat(1000);
    let mut acked = Vec::new();
    for r in 0..180 {
        let updates: Vec<(&str, Value)> = (0..50)
            .map(|i| (":data", json!({"r": r, "i": i, "pad": padding})))
            .collect();
        acked.extend(server.publish_batch(&updates).await);
    }
    let head = *acked.last().expect("ids");
    // Read until the last message; every step must be the next id, or a reset.
    let mut events = Vec::new();
    let mut previous: Option<u64> = None;
    let stream_events = slow_stream
        .read_until(Duration::from_secs(60), |events| {
            events.last().is_some_and(|e| e.pos() >= head)
        })
        .await;
    for event in stream_events {
        if event.is_reset() {
            previous = Some(event.pos());
        } else {
            if let Some(previous) = previous {
                assert_eq!(
                    event.pos(),
                    previous + 1,
                    "a gap without a reset: {previous} then {}",
                    event.pos()
                );
            }
            previous = Some(event.pos());
        }
        events.push(event);
    }
    assert!(
        events.iter().any(Event::is_reset),
        "the reader lagged past what is kept: it must get a reset"
    );
    assert_eq!(events.last().map(Event::pos), Some(head));
}
