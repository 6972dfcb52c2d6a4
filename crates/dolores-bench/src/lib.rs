//! `dolores bench`: a load generator for loopback servers. The `dolores` binary parses
//! [`BenchArgs`] and calls [`run`]; this crate is apart from the server's so that the
//! server needs none of its dependencies and none of its `unsafe` (raising the open-file
//! limit, binding many source addresses). What both must agree on (paths, transports,
//! the batch limit) comes from `dolores_protocol`.
//!
//! It subscribes N listeners to T tracks through the backend API (`/api/v1/connect`,
//! with uids unique to the run), opens their streams (SSE, WebSocket or long-poll),
//! publishes M messages from C publishers at a fixed rate or as fast as they are
//! answered, and reports how long connecting took, publishes and deliveries per
//! second, end-to-end latency, and loss, duplicates and misroutes — each listener
//! checks it got exactly the messages of its tracks, in each publisher's order. With
//! URL and body templates it drives other push servers over SSE the same way.
//!
//! Everything is bounded: a count of messages and `--timeout` for the whole run, after
//! which it reports what it has and counts what did not come as lost. It only ever
//! targets loopback (127.0.0.0/8, ::1, localhost) and refuses anything else.
//!
//! The hot path is cheap on purpose: one tokio task per listener over a hand-rolled
//! HTTP/1.1 reader ([`wire`]), one clock read per read from the socket, latencies
//! buffered per listener and merged into a few shared histograms.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;

use dolores_protocol::api as paths;

mod check;
mod cpu;
mod listener;
mod plan;
mod publish;
mod report;
mod wire;

use check::Counts;
use listener::{Outcome, Shared};
use plan::{Plan, plan};
use publish::{Published, publish_all};

/// Most backend calls in flight while subscribing listeners.
const SETUP_CONCURRENCY: usize = 64;
/// How long listeners keep reading after the last expected message, to catch
/// duplicates that would come late.
const LINGER: Duration = Duration::from_millis(200);
/// How often the waits look at the shared counters.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// Open files kept for everything but the listeners (publishers, setup, runtime).
const SPARE_FILES: u64 = 64 + SETUP_CONCURRENCY as u64;
/// Longest the listeners' cleanup may take.
const CLEANUP_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for the listener tasks to hand in their results after the stop.
const JOIN_LIMIT: Duration = Duration::from_secs(10);

/// How listeners receive: the server's transports, spelled as the server spells them in
/// `--transport` and in the JSON report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Transport(dolores_protocol::Transport);

impl Transport {
    const SSE: Transport = Transport(dolores_protocol::Transport::Sse);
    const WS: Transport = Transport(dolores_protocol::Transport::Ws);
    const POLL: Transport = Transport(dolores_protocol::Transport::Poll);

    fn name(self) -> &'static str {
        self.0.name()
    }
}

impl clap::ValueEnum for Transport {
    fn value_variants<'a>() -> &'a [Self] {
        &[Transport::SSE, Transport::WS, Transport::POLL]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let kind = match self.0 {
            dolores_protocol::Transport::Sse => "Server-Sent Events",
            dolores_protocol::Transport::Ws => "WebSocket",
            dolores_protocol::Transport::Poll => "Long-polling",
        };
        let help = format!("{kind} (`{}`)", self.0.route());
        Some(clap::builder::PossibleValue::new(self.name()).help(help))
    }
}

impl Serialize for Transport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// The flags of `dolores bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A server to load, like http://127.0.0.1:8007 (repeatable; listeners and
    /// publishers are spread over them round-robin). Loopback only [default: 127.0.0.1:8007]
    #[arg(
        long = "server",
        value_name = "URL",
        env = "DOLORES_SERVER",
        value_delimiter = ','
    )]
    servers: Vec<String>,
    /// Listeners (one stream each)
    #[arg(long, short = 'n', default_value_t = 100)]
    listeners: usize,
    /// Tracks the messages are spread over
    #[arg(long, default_value_t = 1)]
    tracks: usize,
    /// Tracks each listener is connected to
    #[arg(long, default_value_t = 1)]
    tracks_per_listener: usize,
    /// Messages to publish in all
    #[arg(long, short = 'm', default_value_t = 1000)]
    messages: u64,
    /// Concurrent publishers; each sends its next request when the last is answered
    #[arg(long, short = 'c', default_value_t = 1)]
    publishers: usize,
    /// Messages per second over all publishers (default: as fast as answered)
    #[arg(long)]
    rate: Option<f64>,
    /// Messages per update request (Dolores' {"updates": […]}, at most 1000)
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// How listeners receive
    #[arg(long, value_enum, default_value = "sse")]
    transport: Transport,
    /// Longest the whole run may take; then it reports, counting what did not come as lost
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print one JSON object instead of the report
    #[arg(long)]
    json: bool,
    /// Exit with an error (after the report) when anything was lost, duplicated,
    /// misrouted, reordered, reset, dropped or failed, or the run timed out
    #[arg(long)]
    strict: bool,
    /// The backend's api key
    #[arg(long, env = "DOLORES_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Data dir of a local server, to find its generated api key in [default: ./dolores-data]
    #[arg(long, env = "DOLORES_DATA")]
    data: Option<PathBuf>,
    /// Source addresses to spread listener connections over: 127.0.0.2, 127.0.0.3, …
    /// (each has its own range of ports); 0 lets the system choose
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(0..=250))]
    source_addrs: u8,
    /// Most listeners opening their stream at once
    #[arg(long, default_value_t = 256)]
    open_concurrency: usize,
    /// Pad each message to about this many bytes of JSON
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Pause between the last stream opening and the first publish [default: 0s, 1s with --no-connect]
    #[arg(long, value_parser = humantime::parse_duration)]
    settle: Option<Duration>,
    /// Don't subscribe listeners through /api/v1/connect (for foreign servers)
    #[arg(long)]
    no_connect: bool,
    /// Leave the run's listeners on the server (by default they are disconnected at the end)
    #[arg(long)]
    keep_listeners: bool,
    /// Listener stream URL template instead of Dolores' ({server}, {uid}, {track}, {index})
    #[arg(long, value_name = "TEMPLATE")]
    listen_url: Option<String>,
    /// Publish URL template instead of Dolores' /api/v1/update ({server}, {track})
    #[arg(long, value_name = "TEMPLATE")]
    publish_url: Option<String>,
    /// Publish body template with --publish-url ({message}, {message_escaped}, {track})
    #[arg(long, value_name = "TEMPLATE", default_value = "{message}")]
    publish_body: String,
    /// A header for --publish-url requests, like 'Authorization: Bearer x' (repeatable)
    #[arg(long, value_name = "HEADER")]
    publish_header: Vec<String>,
    /// A server process on this machine whose CPU time to report per phase, from
    /// /proc/PID/stat (repeatable, summed: a server and its helper processes)
    #[arg(long = "server-pid", value_name = "PID", value_delimiter = ',')]
    server_pids: Vec<u32>,
}

/// Raises the soft limit of open files to the hard limit; returns the limit now.
#[cfg(unix)]
fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass; nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return u64::MAX;
    }
    // An unlimited hard limit cannot be the soft one for files; a million is plenty.
    let wanted = if limit.rlim_max == libc::RLIM_INFINITY {
        1 << 20
    } else {
        limit.rlim_max
    };
    if limit.rlim_cur < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the
        // hard one is always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            return wanted;
        }
    }
    limit.rlim_cur
}

#[cfg(not(unix))]
fn raise_open_files() -> u64 {
    u64::MAX
}

/// An error with its causes, `a: b: c` (reqwest's own text leaves them out).
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// Forgets the run's listeners (`POST /api/v1/disconnect {"uid"}`), so repeated runs
/// do not pile listeners up in the server; returns how many calls failed or did not
/// finish within [`CLEANUP_LIMIT`].
async fn forget_listeners(plan: &Plan, client: &reqwest::Client) -> u64 {
    let key = plan.api_key.clone().unwrap_or_default();
    let deadline = TokioInstant::now() + CLEANUP_LIMIT;
    let mut answers = futures_util::stream::iter(plan.listeners.iter().enumerate())
        .map(|(n, spec)| {
            let server = &plan.servers[n % plan.servers.len()];
            let request = client
                .post(format!("{}{}", server.base, paths::DISCONNECT))
                .bearer_auth(&key)
                .json(&serde_json::json!({"uid": spec.uid}));
            async move {
                match request.send().await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        let _ = response.bytes().await;
                        ok
                    }
                    Err(_) => false,
                }
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY);
    let mut done = 0;
    let mut failed = 0;
    while let Ok(Some(ok)) = tokio::time::timeout_at(deadline, answers.next()).await {
        done += 1;
        failed += u64::from(!ok);
    }
    failed + (plan.listeners.len() as u64 - done)
}

/// Subscribes every listener to its tracks through `/api/v1/connect`.
async fn setup(
    plan: &Plan,
    client: &reqwest::Client,
    deadline: TokioInstant,
) -> anyhow::Result<u64> {
    let key = plan.api_key.clone().unwrap_or_default();
    let calls = plan.listeners.iter().enumerate().flat_map(|(n, spec)| {
        let server = &plan.servers[n % plan.servers.len()];
        spec.tracks.iter().map(move |&t| (server, spec, t))
    });
    let mut answers = futures_util::stream::iter(calls)
        .map(|(server, spec, t)| {
            let url = format!("{}{}", server.base, paths::CONNECT);
            let body = serde_json::json!({"uid": spec.uid, "track": plan.names[t as usize]});
            let request = client.post(url).bearer_auth(&key).json(&body);
            async move {
                let response = request
                    .send()
                    .await
                    .map_err(|e| anyhow!("cannot reach {}: {}", server.base, causes(&e)))?;
                let status = response.status();
                if status.is_success() {
                    let _ = response.bytes().await;
                    return Ok(());
                }
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                Err(anyhow!(
                    "subscribing listener {} on {}: {}: {} (HTTP {})",
                    spec.uid,
                    server.base,
                    body["error"]["code"].as_str().unwrap_or("error"),
                    body["error"]["message"].as_str().unwrap_or(""),
                    status.as_u16()
                ))
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY);
    let mut done = 0u64;
    loop {
        match tokio::time::timeout_at(deadline, answers.next()).await {
            Ok(Some(Ok(()))) => done += 1,
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Ok(done),
            Err(_) => bail!("subscribing the listeners took longer than --timeout ({done} done)"),
        }
    }
}

/// Waits until `done` says so or the deadline; whether it was done.
async fn wait_until(deadline: TokioInstant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if TokioInstant::now() >= deadline {
            return false;
        }
        let next = (TokioInstant::now() + POLL_EVERY).min(deadline);
        tokio::time::sleep_until(next).await;
    }
}

fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn ns_seconds(ns: u64) -> f64 {
    seconds(Duration::from_nanos(ns))
}

/// `dolores bench`: plan the run, then subscribe, open the streams, publish, wait for
/// the deliveries, collect what each listener saw, clean up and report — the steps
/// `docs/bench.md` lists, each a function below. Every step stops at the run's deadline
/// (`--timeout`).
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let args = Arc::new(args);
    let plan = plan(&args).await?;
    ensure_open_files(&args)?;
    let started = Instant::now();
    let deadline = TokioInstant::now() + args.timeout;
    let client = http_client(&args)?;
    let shared = Arc::new(shared_state(&args, &plan, started));
    let server_cpu = cpu::ServerCpu::new(args.server_pids.clone());
    server_cpu.check()?;
    let cpu_at_start = server_cpu.seconds();

    let setup = if args.no_connect {
        None
    } else {
        Some(subscribe(&plan, &client, deadline).await?)
    };
    let cpu_subscribed = server_cpu.seconds();

    let opened = open_streams(&plan, &shared, deadline).await;
    let mut timed_out = opened.timed_out;
    let cpu_opened = server_cpu.seconds();

    let published = if shared.connected.load(Ordering::Relaxed) > 0 && !timed_out {
        publish_all(&plan, &shared, &client, &args, deadline).await
    } else {
        Vec::new()
    };
    let per_track = per_track(&published, args.tracks);
    let expected = expected_deliveries(&per_track, &shared);
    timed_out |= !wait_for_deliveries(&shared, expected, deadline).await;
    let cpu_delivered = server_cpu.seconds();
    timed_out = stop_listeners(&shared, timed_out, deadline).await;

    let ok_by_publisher: Vec<Vec<u64>> = published.iter().map(|p| p.ok.clone()).collect();
    let mut collected = collect(opened.tasks, &ok_by_publisher).await;
    let elapsed = started.elapsed();
    if !args.no_connect && !args.keep_listeners {
        let failed = forget_listeners(&plan, &client).await;
        if failed > 0 && collected.errors.len() < 10 {
            collected.errors.push(format!(
                "{failed} listeners could not be disconnected at the end"
            ));
        }
    }
    for p in &published {
        if let Some(error) = &p.error
            && collected.errors.len() < 10
        {
            collected.errors.push(error.clone());
        }
    }

    let measured = Measured {
        timed_out,
        elapsed,
        setup,
        connect_seconds: opened.seconds,
        published,
        per_track,
        expected,
        collected,
        cpu: [cpu_at_start, cpu_subscribed, cpu_opened, cpu_delivered],
    };
    let report = build_report(&args, &plan, &shared, &server_cpu, measured);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.human());
    }
    if args.strict && !report.clean() {
        bail!("the run was not clean (see the report)");
    }
    Ok(())
}

/// Raises the open-file limit, and refuses a run that would need more files than the
/// process may open.
fn ensure_open_files(args: &BenchArgs) -> anyhow::Result<()> {
    let files = raise_open_files();
    let needed = args.listeners as u64 + args.publishers as u64 + SPARE_FILES;
    if needed > files {
        bail!(
            "{} listeners need about {needed} open files, and this process may open {files} \
             (the hard limit, `ulimit -Hn`); use fewer listeners or raise the limit",
            args.listeners
        );
    }
    Ok(())
}

/// The client for the backend calls and the publishers.
fn http_client(args: &BenchArgs) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .pool_max_idle_per_host(SETUP_CONCURRENCY.max(args.publishers))
        .build()
        .context("cannot make an HTTP client")
}

/// What every listener task shares: the counters the steps wait on and the histograms.
fn shared_state(args: &BenchArgs, plan: &Plan, started: Instant) -> Shared {
    let shard_count = (std::thread::available_parallelism().map_or(2, usize::from) * 4).max(8);
    Shared {
        start: started,
        names: plan.names.clone(),
        publishers: args.publishers,
        transport: args.transport,
        gate: Semaphore::new(args.open_concurrency),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        alive: AtomicUsize::new(0),
        on_track: (0..args.tracks).map(|_| AtomicU64::new(0)).collect(),
        unique: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        last_connect_ns: AtomicU64::new(0),
        latency: (0..shard_count)
            .map(|_| Mutex::new(listener::histogram()))
            .collect(),
        connect_latency: Mutex::new(listener::histogram()),
        stop: CancellationToken::new(),
    }
}

/// Setup: subscribes every listener to its tracks, timed.
async fn subscribe(
    plan: &Plan,
    client: &reqwest::Client,
    deadline: TokioInstant,
) -> anyhow::Result<report::Setup> {
    let began = Instant::now();
    let calls = setup(plan, client, deadline).await?;
    Ok(report::Setup {
        subscriptions: calls,
        seconds: seconds(began.elapsed()),
    })
}

/// The listener tasks, once every stream is open or has failed.
#[derive(Debug)]
struct Opened {
    /// One task per listener; each hands in its [`Outcome`] when stopped.
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
    /// From the first opening to the last stream open.
    seconds: f64,
    /// Whether the deadline came first.
    timed_out: bool,
}

/// Connect: starts one task per listener and waits until each stream is open or has
/// failed, then for `--settle`.
async fn open_streams(plan: &Plan, shared: &Arc<Shared>, deadline: TokioInstant) -> Opened {
    let began_ns = shared.now_ns();
    let tasks: Vec<_> = plan
        .listeners
        .iter()
        .enumerate()
        .map(|(n, spec)| tokio::spawn(listener::run(shared.clone(), n, spec.clone())))
        .collect();
    let total = plan.listeners.len();
    let all_tried = wait_until(deadline, || {
        shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) >= total
    })
    .await;
    let seconds = ns_seconds(
        shared
            .last_connect_ns
            .load(Ordering::Relaxed)
            .saturating_sub(began_ns),
    );
    if !plan.settle.is_zero() && all_tried {
        tokio::time::sleep_until((TokioInstant::now() + plan.settle).min(deadline)).await;
    }
    Opened {
        tasks,
        seconds,
        timed_out: !all_tried,
    }
}

/// Messages stored, per track, over all publishers.
fn per_track(published: &[Published], tracks: usize) -> Vec<u64> {
    (0..tracks)
        .map(|t| {
            published
                .iter()
                .map(|p| p.ok.get(t).copied().unwrap_or(0))
                .sum()
        })
        .collect()
}

/// Deliveries the run should see: each stored message once per listener on its track.
fn expected_deliveries(per_track: &[u64], shared: &Shared) -> u64 {
    per_track
        .iter()
        .zip(&shared.on_track)
        .map(|(ok, listeners)| ok * listeners.load(Ordering::Relaxed))
        .sum()
}

/// Receive: waits until every expected delivery came or no listener is left; whether
/// that happened before the deadline.
async fn wait_for_deliveries(shared: &Shared, expected: u64, deadline: TokioInstant) -> bool {
    wait_until(deadline, || {
        shared.unique.load(Ordering::Relaxed) >= expected
            || shared.alive.load(Ordering::Relaxed) == 0
    })
    .await
}

/// Lets the listeners read on for [`LINGER`] (to catch late duplicates), then tells
/// them to stop; returns whether the run has timed out.
async fn stop_listeners(shared: &Shared, timed_out: bool, deadline: TokioInstant) -> bool {
    if !timed_out {
        tokio::time::sleep_until((TokioInstant::now() + LINGER).min(deadline)).await;
    }
    let timed_out = timed_out || TokioInstant::now() >= deadline;
    shared.stop.cancel();
    timed_out
}

/// What the listeners handed in.
#[derive(Debug, Default)]
struct Collected {
    counts: Counts,
    loss: u64,
    /// Streams that opened.
    made: u64,
    /// Streams that never opened.
    failed: u64,
    /// Streams the server closed.
    drops: u64,
    /// The first few errors, for the report.
    errors: Vec<String>,
}

/// Collects each listener's outcome (a stuck one is aborted after
/// [`JOIN_LIMIT`]) and adds them up.
async fn collect(
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
    ok_by_publisher: &[Vec<u64>],
) -> Collected {
    let mut collected = Collected::default();
    // Listeners stop at once when told; this only bounds a stuck one.
    let join_deadline = TokioInstant::now() + JOIN_LIMIT;
    for mut task in tasks {
        let outcome: Outcome = match tokio::time::timeout_at(join_deadline, &mut task).await {
            Ok(Ok(outcome)) => outcome,
            _ => {
                task.abort();
                continue;
            }
        };
        if outcome.connected {
            collected.made += 1;
            collected.loss += outcome.checker.loss(ok_by_publisher);
            collected.counts.add(&outcome.checker.counts);
        } else {
            collected.failed += 1;
        }
        if outcome.dropped {
            collected.drops += 1;
        }
        if let Some(error) = outcome.error
            && collected.errors.len() < 5
        {
            collected.errors.push(error);
        }
    }
    collected
}

/// What the steps measured, for the report.
#[derive(Debug)]
struct Measured {
    timed_out: bool,
    elapsed: Duration,
    setup: Option<report::Setup>,
    connect_seconds: f64,
    published: Vec<Published>,
    per_track: Vec<u64>,
    expected: u64,
    collected: Collected,
    /// The servers' CPU seconds at the start, subscribed, opened and delivered.
    cpu: [f64; 4],
}

/// The report, from the shared histograms and what the steps measured.
fn build_report(
    args: &BenchArgs,
    plan: &Plan,
    shared: &Shared,
    server_cpu: &cpu::ServerCpu,
    measured: Measured,
) -> report::Report {
    let Measured {
        timed_out,
        elapsed,
        setup,
        connect_seconds,
        published,
        per_track,
        expected,
        collected,
        cpu,
    } = measured;
    let mut latency = listener::histogram();
    for shard in &shared.latency {
        let shard = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = latency.add(&*shard);
    }
    let connect_latency = shared
        .connect_latency
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let first_send = published.iter().filter_map(|p| p.first_send_ns).min();
    let last_ack = published.iter().map(|p| p.last_ack_ns).max().unwrap_or(0);
    let messages_ok: u64 = per_track.iter().sum();
    let publish_span = first_send.map_or(0, |f| last_ack.saturating_sub(f));
    let last_delivery = shared.last_delivery_ns.load(Ordering::Relaxed);
    let delivery_span = first_send.map_or(0, |f| last_delivery.saturating_sub(f));
    let rate = |count: u64, span_ns: u64| {
        if span_ns == 0 {
            0.0
        } else {
            (count as f64 / (span_ns as f64 / 1e9)).round()
        }
    };
    let counts = collected.counts;
    report::Report {
        run: plan.run.clone(),
        servers: plan.servers.iter().map(|s| s.base.clone()).collect(),
        transport: args.transport,
        listeners: args.listeners,
        tracks: args.tracks,
        tracks_per_listener: args.tracks_per_listener,
        publishers: args.publishers,
        messages: args.messages,
        batch: args.batch,
        rate: args.rate,
        source_addrs: plan.sources.iter().map(ToString::to_string).collect(),
        complete: !timed_out,
        timed_out,
        elapsed_s: seconds(elapsed),
        setup,
        connections: report::Connections {
            made: collected.made,
            failed: collected.failed,
            seconds: connect_seconds,
            connect_ms: report::Quantiles::of(&connect_latency),
        },
        publish: report::Publish {
            ok: messages_ok,
            failed: published.iter().map(|p| p.failed).sum(),
            requests: published.iter().map(|p| p.requests).sum(),
            seconds: ns_seconds(publish_span),
            per_second: rate(messages_ok, publish_span),
        },
        deliveries: report::Deliveries {
            expected,
            unique: counts.unique,
            received: counts.received,
            seconds: ns_seconds(delivery_span),
            per_second: rate(counts.unique, delivery_span),
        },
        latency_ms: report::Quantiles::of(&latency),
        loss: collected.loss,
        duplicates: counts.duplicates,
        misroutes: counts.misroutes,
        reordered: counts.reordered,
        resets: counts.resets,
        drops: collected.drops,
        errors: collected.errors,
        server_cpu: server_cpu
            .enabled()
            .then(|| server_cpu.report(cpu, counts.unique, messages_ok)),
    }
}
