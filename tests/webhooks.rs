//! Webhooks against the real binary, with a small HTTP receiver in the test playing
//! the app: events arrive signed, in order per listener, an offline only after the
//! grace; a failing app gets them again; the outbox is bounded, survives `kill -9`,
//! and after one the listeners reported online are reported offline unless they come
//! back; a hanging app slows no publish. On Redis, a cluster sends each event once.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::{Server, Sse, WAIT, eventually, uid, within};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "webhook-test-secret";
/// The grace the tests run with: short, and long enough to reopen a stream within it.
const GRACE: Duration = Duration::from_millis(1500);

/// What the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    Fail,
    Hang,
}

/// One event the receiver took (answered 200).
#[derive(Debug, Clone)]
struct Got {
    signature: String,
    body: String,
    json: Value,
    at: Instant,
}

impl Got {
    fn kind(&self) -> &str {
        self.json["type"].as_str().unwrap_or_default()
    }
    fn subject(&self) -> &str {
        let data = &self.json["data"];
        data["uid"]
            .as_str()
            .or_else(|| data["track"].as_str())
            .unwrap_or_default()
    }
    fn id(&self) -> &str {
        self.json["id"].as_str().unwrap_or_default()
    }
}

#[derive(Debug)]
struct ReceiverState {
    answer: Mutex<Answer>,
    got: Mutex<Vec<Got>>,
    tries: AtomicUsize,
    hanging: AtomicUsize,
}

/// The app's webhook endpoint, on a loopback port of its own.
#[derive(Debug, Clone)]
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
}

async fn hook(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    state.tries.fetch_add(1, Ordering::SeqCst);
    let answer = *state.answer.lock().expect("lock");
    match answer {
        Answer::Ok => {
            let signature = headers
                .get("dolores-signature")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let json = serde_json::from_str(&body).unwrap_or(Value::Null);
            state.got.lock().expect("lock").push(Got {
                signature,
                body,
                json,
                at: Instant::now(),
            });
            StatusCode::OK
        }
        Answer::Fail => StatusCode::INTERNAL_SERVER_ERROR,
        Answer::Hang => {
            state.hanging.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            StatusCode::OK
        }
    }
}

impl Receiver {
    async fn start(answer: Answer) -> Self {
        let state = Arc::new(ReceiverState {
            answer: Mutex::new(answer),
            got: Mutex::default(),
            tries: AtomicUsize::new(0),
            hanging: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/hook"),
            state,
        }
    }

    fn answer(&self, answer: Answer) {
        *self.state.answer.lock().expect("lock") = answer;
    }

    fn got(&self) -> Vec<Got> {
        self.state.got.lock().expect("lock").clone()
    }

    fn tries(&self) -> usize {
        self.state.tries.load(Ordering::SeqCst)
    }

    /// The events about `subject`, as `type` names, in the order they were taken.
    fn kinds_of(&self, subject: &str) -> Vec<String> {
        self.got()
            .iter()
            .filter(|g| g.subject() == subject)
            .map(|g| g.kind().to_owned())
            .collect()
    }

    /// Waits until the events about `subject` are `kinds`, in that order.
    async fn wait_for(&self, subject: &str, kinds: &[&str]) {
        eventually(
            &format!("webhooks {kinds:?} about {subject}"),
            WAIT,
            || async { (self.kinds_of(subject).len() >= kinds.len()).then_some(()) },
        )
        .await;
        assert_eq!(self.kinds_of(subject), kinds, "{subject}");
    }
}

/// Checks `t=…,v1=…` against the body, as an app must.
fn assert_signed(got: &Got, secret: &str) {
    let (t, v1) = got
        .signature
        .split_once(",v1=")
        .and_then(|(t, v1)| Some((t.strip_prefix("t=")?, v1)))
        .unwrap_or_else(|| panic!("signature {:?}", got.signature));
    let t: u64 = t.parse().expect("t is a number");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    assert!(t.abs_diff(now) < 60, "t={t}, now {now}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{t}.{}", got.body).as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, expected, "signature of {}", got.body);
}

fn webhook_args(receiver: &Receiver) -> Vec<String> {
    [
        "--webhook-url",
        &receiver.url,
        "--webhook-secret",
        SECRET,
        "--webhook-max-backoff",
        "200ms",
        "--presence-grace",
        &format!("{}ms", GRACE.as_millis()),
        "--heartbeat",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A metric's value from `/metrics`.
async fn metric(server: &Server, name: &str) -> f64 {
    let text = server
        .client()
        .get(format!("{}/metrics", server.url()))
        .bearer_auth(server.api_key())
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

async fn wait_metric(server: &Server, name: &str, value: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = metric(server, name).await;
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {now}, not {value}, after {WAIT:?}; the server logged:\n{}",
            server.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens a stream for a new listener on `track`; its uid and the stream.
async fn online(server: &Server, prefix: &str, track: &str) -> (String, Sse) {
    let u = uid(prefix);
    server.connect(&u, track).await;
    let sse = server.listen(&u).await;
    (u, sse)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_signed_and_an_offline_only_after_the_grace() {
    let receiver = Receiver::start(Answer::Ok).await;
    let server = Server::config().args(webhook_args(&receiver)).start().await;
    let track = format!(":room-{}", uid("t"));
    let (u, first) = online(&server, "hooked", &track).await;
    receiver.wait_for(&u, &["listener.online"]).await;
    receiver.wait_for(&track, &["track.occupied"]).await;

    // A reload: the stream closes and another opens within the grace.
    drop(first);
    let second = server.listen(&u).await;
    drop(second);
    let closed = Instant::now();
    receiver
        .wait_for(&u, &["listener.online", "listener.offline"])
        .await;
    receiver
        .wait_for(&track, &["track.occupied", "track.vacated"])
        .await;
    let got = receiver.got();
    let offline = got
        .iter()
        .find(|g| g.kind() == "listener.offline")
        .expect("offline");
    assert!(
        offline.at.duration_since(closed) >= GRACE - Duration::from_millis(100),
        "offline {:?} after the stream closed, grace {GRACE:?}",
        offline.at.duration_since(closed)
    );
    for g in &got {
        assert_signed(g, SECRET);
        assert!(g.id().starts_with("evt_"), "{}", g.body);
        let time = g.json["time"].as_str().expect("time");
        assert!(
            humantime::parse_rfc3339(time).is_ok(),
            "time {time:?} is RFC 3339"
        );
        let keys: HashSet<_> = g.json.as_object().expect("object").keys().collect();
        assert_eq!(keys.len(), 4, "{}", g.body);
    }
    let ids: HashSet<_> = got.iter().map(Got::id).collect();
    assert_eq!(ids.len(), got.len(), "ids are unique");
    wait_metric(&server, "dolores_webhook_events_delivered_total", 4.0).await;
    wait_metric(&server, "dolores_webhook_events_pending", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_webhook_secret_events_are_signed_with_the_api_key() {
    let receiver = Receiver::start(Answer::Ok).await;
    let server = Server::config()
        .memory()
        .args(["--webhook-url", &receiver.url])
        .start()
        .await;
    let (u, _sse) = online(&server, "keyed", ":keyed").await;
    receiver.wait_for(&u, &["listener.online"]).await;
    let got = receiver.got();
    let online = got.iter().find(|g| g.subject() == u).expect("online");
    assert_signed(online, server.api_key());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_app_gets_every_event_again_in_order_per_listener() {
    let receiver = Receiver::start(Answer::Fail).await;
    let server = Server::config()
        .memory()
        .args(webhook_args(&receiver))
        .start()
        .await;
    let mut uids = Vec::new();
    for n in 0..3 {
        let (u, sse) = online(&server, "flaky", ":flaky").await;
        // A stream closed before presence saw it open is no online (nor offline).
        wait_metric(&server, "dolores_webhook_events_pending", n as f64 + 2.0).await;
        drop(sse);
        uids.push(u);
    }
    // Each listener's online and offline, and the track's two, wait in the outbox
    // while the app fails.
    eventually("every event in the outbox", WAIT, || async {
        let pending = metric(&server, "dolores_webhook_events_pending").await;
        let failed = metric(&server, "dolores_webhook_attempts_failed_total").await;
        (pending == 8.0 && failed >= 3.0).then_some(())
    })
    .await;
    assert!(receiver.got().is_empty());
    receiver.answer(Answer::Ok);
    for u in &uids {
        receiver
            .wait_for(u, &["listener.online", "listener.offline"])
            .await;
    }
    receiver
        .wait_for(":flaky", &["track.occupied", "track.vacated"])
        .await;
    wait_metric(&server, "dolores_webhook_events_pending", 0.0).await;
    assert!(receiver.tries() > 8, "retried: {} tries", receiver.tries());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_bound_the_outbox_drops_the_oldest_counts_and_says_so() {
    let receiver = Receiver::start(Answer::Fail).await;
    let server = Server::config()
        .args(webhook_args(&receiver))
        .args(["--webhook-outbox-max", "3"])
        .spawn()
        .await;
    let track = format!(":full-{}", uid("t"));
    let mut streams = Vec::new();
    let mut uids = Vec::new();
    // One at a time, so the order of the events is known: the first listener's
    // online and the track's occupied, then one online per listener.
    for n in 0..5 {
        let (u, sse) = online(&server, "bounded", &track).await;
        streams.push(sse);
        uids.push(u);
        let events = if n == 0 { 2.0 } else { n as f64 + 2.0 };
        eventually("the event in the outbox", WAIT, || async {
            let pending = metric(&server, "dolores_webhook_events_pending").await;
            let dropped = metric(&server, "dolores_webhook_events_dropped_total").await;
            (pending + dropped == events).then_some(())
        })
        .await;
    }
    assert_eq!(
        metric(&server, "dolores_webhook_events_dropped_total").await,
        3.0
    );
    assert_eq!(metric(&server, "dolores_webhook_events_pending").await, 3.0);
    let log = server.stderr_text();
    assert_eq!(
        log.matches("webhook outbox is full").count(),
        1,
        "said once per burst:\n{log}"
    );
    receiver.answer(Answer::Ok);
    wait_metric(&server, "dolores_webhook_events_pending", 0.0).await;
    let sent: HashSet<String> = receiver
        .got()
        .iter()
        .map(|g| g.subject().to_owned())
        .collect();
    let newest: HashSet<String> = uids[2..].iter().cloned().collect();
    assert_eq!(sent, newest, "the three newest events, and only them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_pending_at_kill_9_are_all_sent_after_the_restart() {
    let receiver = Receiver::start(Answer::Fail).await;
    let mut server = Server::config().args(webhook_args(&receiver)).spawn().await;
    let mut uids = Vec::new();
    for n in 0..4 {
        let (u, sse) = online(&server, "durable", ":durable").await;
        // A stream closed before presence saw it open is no online (nor offline).
        wait_metric(&server, "dolores_webhook_events_pending", n as f64 + 2.0).await;
        drop(sse);
        uids.push(u);
    }
    // 4 onlines, 4 offlines, occupied, vacated: all written, none taken.
    wait_metric(&server, "dolores_webhook_events_pending", 10.0).await;
    server.kill9().await;
    receiver.answer(Answer::Ok);
    server.restart().await;
    for u in &uids {
        receiver
            .wait_for(u, &["listener.online", "listener.offline"])
            .await;
    }
    receiver
        .wait_for(":durable", &["track.occupied", "track.vacated"])
        .await;
    wait_metric(&server, "dolores_webhook_events_pending", 0.0).await;
    for g in receiver.got() {
        assert_signed(&g, SECRET);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_who_was_reported_online_goes_offline_unless_back_within_the_grace() {
    let receiver = Receiver::start(Answer::Ok).await;
    let mut server = Server::config().args(webhook_args(&receiver)).spawn().await;
    let gone_track = format!(":gone-{}", uid("t"));
    let back_track = format!(":back-{}", uid("t"));
    let (gone, gone_sse) = online(&server, "gone", &gone_track).await;
    let (back, back_sse) = online(&server, "back", &back_track).await;
    receiver.wait_for(&gone, &["listener.online"]).await;
    receiver.wait_for(&gone_track, &["track.occupied"]).await;
    receiver.wait_for(&back, &["listener.online"]).await;
    receiver.wait_for(&back_track, &["track.occupied"]).await;
    // The app took them: nothing about them is left in the outbox to resend.
    wait_metric(&server, "dolores_webhook_events_pending", 0.0).await;

    server.kill9().await;
    let killed = Instant::now();
    drop((gone_sse, back_sse));
    server.restart().await;
    // One comes back within the grace (a new port: its page reconnects); one never.
    let _back_again = server.listen(&back).await;
    receiver
        .wait_for(&gone, &["listener.online", "listener.offline"])
        .await;
    receiver
        .wait_for(&gone_track, &["track.occupied", "track.vacated"])
        .await;
    let got = receiver.got();
    let offline = got
        .iter()
        .find(|g| g.subject() == gone && g.kind() == "listener.offline")
        .expect("offline");
    assert!(
        offline.at.duration_since(killed) >= GRACE,
        "offline {:?} after the kill, grace {GRACE:?}",
        offline.at.duration_since(killed)
    );
    // Had the one that came back been due too, it would have gone out with the other
    // (same grace, same batch): once the outbox is empty, nothing more is coming.
    wait_metric(&server, "dolores_webhook_events_pending", 0.0).await;
    assert_eq!(receiver.kinds_of(&back), ["listener.online"]);
    assert_eq!(receiver.kinds_of(&back_track), ["track.occupied"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_app_slows_no_publish_no_delivery_and_no_shutdown() {
    let receiver = Receiver::start(Answer::Hang).await;
    let mut server = Server::config()
        .args(webhook_args(&receiver))
        .args(["--webhook-timeout", "60s"])
        .spawn()
        .await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(online(&server, "hung", &format!(":hung-{}", uid("t"))).await);
    }
    // Every sending slot is taken by a request the app never answers.
    eventually("the app to hold 16 requests", WAIT, || async {
        (receiver.state.hanging.load(Ordering::SeqCst) >= 16).then_some(())
    })
    .await;
    let (u, mut sse) = online(&server, "reader", ":hung-reader").await;
    let mut slowest = Duration::ZERO;
    for n in 0..50 {
        let started = Instant::now();
        server.publish(":hung-reader", json!(n)).await;
        slowest = slowest.max(started.elapsed());
    }
    let events = within("the 50 messages", WAIT, sse.events(50)).await;
    assert_eq!(events.len(), 50);
    assert!(
        slowest < Duration::from_millis(500),
        "slowest update took {slowest:?} while the app hangs"
    );
    assert!(receiver.kinds_of(&u).is_empty());
    drop(streams);
    drop(sse);
    // Requests the app never answers do not hold the server up either.
    let status = server.terminate_within(Duration::from_secs(8)).await;
    assert!(status.success(), "{status:?}");
}

fn shared_redis() -> String {
    std::env::var("DOLORES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_three_sends_each_event_once() {
    let receiver = Receiver::start(Answer::Ok).await;
    let prefix = format!("dolores-webhooks-{}-{}", std::process::id(), uid("p"));
    let redis = shared_redis();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            Server::config()
                .args(["--redis", &redis, "--redis-prefix", &prefix])
                .args(webhook_args(&receiver))
                .start()
                .await,
        );
    }
    let mut uids = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let (u, sse) = online(node, &format!("node{n}"), ":cluster").await;
        receiver.wait_for(&u, &["listener.online"]).await;
        drop(sse);
        uids.push(u);
    }
    for u in &uids {
        receiver
            .wait_for(u, &["listener.online", "listener.offline"])
            .await;
    }
    receiver
        .wait_for(":cluster", &["track.occupied", "track.vacated"])
        .await;
    for node in &nodes {
        wait_metric(node, "dolores_webhook_events_pending", 0.0).await;
    }
    let got = receiver.got();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for g in &got {
        *seen.entry(g.id().to_owned()).or_default() += 1;
        assert_signed(g, SECRET);
    }
    assert!(seen.values().all(|&n| n == 1), "each id once: {seen:?}");
    assert_eq!(
        got.len(),
        8,
        "{:?}",
        got.iter().map(|g| &g.body).collect::<Vec<_>>()
    );
}
