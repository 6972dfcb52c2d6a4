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

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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

use dolores_protocol::api::{self as paths, MAX_BATCH};
use dolores_protocol::local::{API_KEY_FILE, DEFAULT_DATA, DEFAULT_LISTEN};

mod check;
mod cpu;
mod listener;
mod report;
mod wire;

use check::Counts;
use listener::{ListenerSpec, Outcome, Shared};
use wire::Payload;

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

/// A server the run targets.
#[derive(Debug, Clone)]
struct Server {
    /// `http://host:port`, as given (normalized).
    base: String,
}

/// Where a URL's connections go: resolved once per `host:port`.
#[derive(Debug, Default)]
struct Resolver {
    cache: HashMap<String, SocketAddr>,
}

/// The loopback check, on a URL's host.
fn loopback_host(host: &str) -> Option<LoopbackHost> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<Ipv4Addr>() {
        return ip.is_loopback().then_some(LoopbackHost::Ip(IpAddr::V4(ip)));
    }
    if let Ok(ip) = bare.parse::<Ipv6Addr>() {
        return ip.is_loopback().then_some(LoopbackHost::Ip(IpAddr::V6(ip)));
    }
    bare.eq_ignore_ascii_case("localhost")
        .then_some(LoopbackHost::Localhost)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoopbackHost {
    Ip(IpAddr),
    Localhost,
}

fn refuse(url: &str) -> anyhow::Error {
    anyhow!(
        "refusing to target {url}: dolores bench only loads loopback servers \
         (127.0.0.0/8, ::1 or localhost), never another host"
    )
}

/// Parses `text` as an http(s)-less URL on loopback.
fn loopback_url(text: &str, schemes: &[&str]) -> anyhow::Result<reqwest::Url> {
    let url = reqwest::Url::parse(text).map_err(|e| anyhow!("{text:?} is not a URL: {e}"))?;
    let host = url.host_str().unwrap_or("");
    if loopback_host(host).is_none() {
        return Err(refuse(text));
    }
    if !schemes.contains(&url.scheme()) {
        bail!(
            "{text}: dolores bench speaks {} here, not {}",
            schemes.join(" or "),
            url.scheme()
        );
    }
    Ok(url)
}

impl Resolver {
    /// The address to connect to for `url` (already checked to be on loopback).
    async fn resolve(&mut self, url: &reqwest::Url) -> anyhow::Result<SocketAddr> {
        let host = url.host_str().unwrap_or("");
        let port = url.port_or_known_default().unwrap_or(80);
        let key = format!("{host}:{port}");
        if let Some(addr) = self.cache.get(&key) {
            return Ok(*addr);
        }
        let addr = match loopback_host(host) {
            Some(LoopbackHost::Ip(ip)) => SocketAddr::new(ip, port),
            Some(LoopbackHost::Localhost) => {
                let found: Vec<SocketAddr> = tokio::net::lookup_host(("localhost", port))
                    .await
                    .with_context(|| format!("cannot resolve localhost for {url}"))?
                    .filter(|a| a.ip().is_loopback())
                    .collect();
                found
                    .iter()
                    .find(|a| a.is_ipv4())
                    .or(found.first())
                    .copied()
                    .ok_or_else(|| anyhow!("localhost does not resolve to a loopback address"))?
            }
            None => return Err(refuse(url.as_str())),
        };
        self.cache.insert(key, addr);
        Ok(addr)
    }
}

fn normalize_server(text: &str) -> String {
    let text = text.trim().trim_end_matches('/');
    if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    }
}

/// Everything decided before the run starts.
#[derive(Debug)]
struct Plan {
    run: String,
    servers: Vec<Server>,
    names: Vec<String>,
    listeners: Vec<ListenerSpec>,
    publishers: Vec<PublisherSpec>,
    sources: Vec<IpAddr>,
    api_key: Option<String>,
    settle: Duration,
}

/// One publisher's share of the work.
#[derive(Debug, Clone)]
struct PublisherSpec {
    index: usize,
    count: u64,
    endpoint: Endpoint,
}

/// Where a publisher sends its messages.
#[derive(Debug, Clone)]
enum Endpoint {
    /// Dolores' `/api/v1/update`.
    Dolores { url: String, key: String },
    /// A foreign server: a URL per track and a body template.
    Foreign {
        urls: Vec<String>,
        body: String,
        headers: Vec<(String, String)>,
    },
}

fn api_key(args: &BenchArgs) -> anyhow::Result<String> {
    let data = args.data.clone().unwrap_or_else(|| DEFAULT_DATA.into());
    Ok(dolores_protocol::local::api_key_or_file(
        args.api_key.as_deref().filter(|k| !k.is_empty()),
        &data.join(API_KEY_FILE),
    )?)
}

fn check_args(args: &BenchArgs) -> anyhow::Result<()> {
    if args.listeners == 0 || args.tracks == 0 || args.publishers == 0 || args.messages == 0 {
        bail!("--listeners, --tracks, --publishers and --messages must each be at least 1");
    }
    if args.tracks_per_listener == 0 || args.tracks_per_listener > args.tracks {
        bail!(
            "--tracks-per-listener must be from 1 to --tracks ({})",
            args.tracks
        );
    }
    if args.batch == 0 || args.batch > MAX_BATCH {
        bail!("--batch must be from 1 to {MAX_BATCH}");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of messages per second");
    }
    if args.open_concurrency == 0 {
        bail!("--open-concurrency must be at least 1");
    }
    if args.timeout.is_zero() {
        bail!("--timeout must be longer than zero");
    }
    if args.listen_url.is_some() {
        if args.transport == Transport::POLL {
            bail!("--listen-url works with --transport sse or ws (long-poll is Dolores' own)");
        }
        if args.tracks_per_listener != 1 {
            bail!("--listen-url takes one track per listener (--tracks-per-listener 1)");
        }
    }
    if args.publish_url.is_some() && args.batch != 1 {
        bail!("--batch is Dolores' batch update; it does not go with --publish-url");
    }
    Ok(())
}

fn expand(template: &str, pairs: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in pairs {
        out = out.replace(name, value);
    }
    out
}

/// The padding field's value for `--payload-bytes`.
fn padding(payload_bytes: usize) -> String {
    let bare = Payload {
        s: u64::from(u32::MAX) * 1000,
        p: 0,
        g: 0,
        t: 0,
        i: 0,
    }
    .to_json("")
    .len();
    // `,"x":""` adds 7 bytes around the padding.
    "x".repeat(payload_bytes.saturating_sub(bare + 7))
}

async fn plan(args: &BenchArgs) -> anyhow::Result<Plan> {
    check_args(args)?;
    let mut resolver = Resolver::default();
    let servers: Vec<String> = if args.servers.is_empty() {
        vec![normalize_server(DEFAULT_LISTEN)]
    } else {
        args.servers.iter().map(|s| normalize_server(s)).collect()
    };
    let mut checked = Vec::new();
    for base in servers {
        let url = loopback_url(&base, &["http"])?;
        resolver.resolve(&url).await?;
        checked.push(Server { base });
    }
    let servers = checked;
    let run = format!("{:08x}", rand::random::<u32>());
    let names: Vec<String> = (0..args.tracks)
        .map(|t| format!("bench-{run}-t{t}"))
        .collect();
    let sources: Vec<IpAddr> = (0..args.source_addrs)
        .map(|j| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + j)))
        .take(args.listeners)
        .collect();

    let mut listeners = Vec::with_capacity(args.listeners);
    let ws_scheme = args.transport == Transport::WS;
    for n in 0..args.listeners {
        let server = &servers[n % servers.len()];
        let uid = format!("bench-{run}-{n}");
        // Listener n's tracks: consecutive from a start that walks past every server.
        let first = (n / servers.len()) % args.tracks;
        let tracks: Vec<u32> = (0..args.tracks_per_listener)
            .map(|k| u32::try_from((first + k) % args.tracks).unwrap_or(u32::MAX))
            .collect();
        let text = match &args.listen_url {
            Some(template) => expand(
                template,
                &[
                    ("{server}", &server.base),
                    ("{uid}", &uid),
                    ("{track}", &names[tracks[0] as usize]),
                    ("{index}", &n.to_string()),
                ],
            ),
            None => format!("{}{}{uid}", server.base, args.transport.0.prefix()),
        };
        let schemes: &[&str] = if ws_scheme {
            &["http", "ws"]
        } else {
            &["http"]
        };
        let url = loopback_url(&text, schemes)?;
        let addr = resolver.resolve(&url).await?;
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or("")),
            None => url.host_str().unwrap_or("").to_owned(),
        };
        let target = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let source = match addr.ip() {
            IpAddr::V4(_) if !sources.is_empty() => Some(sources[n % sources.len()]),
            _ => None,
        };
        listeners.push(ListenerSpec {
            uid,
            addr,
            host,
            target,
            source,
            tracks,
        });
    }

    let needs_key = !args.no_connect || args.publish_url.is_none();
    let api_key = if needs_key {
        Some(api_key(args)?)
    } else {
        None
    };
    let per_publisher = args.messages / args.publishers as u64;
    let extra = args.messages % args.publishers as u64;
    let mut publishers = Vec::with_capacity(args.publishers);
    for index in 0..args.publishers {
        let server = &servers[index % servers.len()];
        let endpoint = match &args.publish_url {
            None => Endpoint::Dolores {
                url: format!("{}{}", server.base, paths::UPDATE),
                key: api_key.clone().unwrap_or_default(),
            },
            Some(template) => {
                let mut urls = Vec::with_capacity(names.len());
                for name in &names {
                    let text = expand(template, &[("{server}", &server.base), ("{track}", name)]);
                    loopback_url(&text, &["http"])?;
                    urls.push(text);
                }
                let headers = args
                    .publish_header
                    .iter()
                    .map(|h| {
                        h.split_once(':')
                            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                            .ok_or_else(|| {
                                anyhow!("--publish-header {h:?}: write it as 'Name: value'")
                            })
                    })
                    .collect::<anyhow::Result<_>>()?;
                Endpoint::Foreign {
                    urls,
                    body: args.publish_body.clone(),
                    headers,
                }
            }
        };
        publishers.push(PublisherSpec {
            index,
            count: per_publisher + u64::from((index as u64) < extra),
            endpoint,
        });
    }
    let settle = args.settle.unwrap_or(if args.no_connect {
        Duration::from_secs(1)
    } else {
        Duration::ZERO
    });
    Ok(Plan {
        run,
        servers,
        names,
        listeners,
        publishers,
        sources,
        api_key,
        settle,
    })
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

/// How one publisher did.
#[derive(Debug, Default)]
struct Published {
    /// Messages stored, per track.
    ok: Vec<u64>,
    /// Messages whose request failed.
    failed: u64,
    /// Requests sent.
    requests: u64,
    /// When the first request went out, ns since the start.
    first_send_ns: Option<u64>,
    /// When the last answer came, ns since the start.
    last_ack_ns: u64,
    /// The first failure.
    error: Option<String>,
}

/// Runs one publisher until its share is sent or the deadline.
async fn publish(
    spec: PublisherSpec,
    shared: Arc<Shared>,
    client: reqwest::Client,
    args: Arc<BenchArgs>,
    began: TokioInstant,
    deadline: TokioInstant,
) -> Published {
    let tracks = shared.names.len();
    let mut out = Published {
        ok: vec![0; tracks],
        ..Published::default()
    };
    let mut next_i = vec![0u64; tracks];
    let per_request = args.batch as u64;
    let pad = padding(args.payload_bytes);
    // Each request carries `per_request` messages; spread the publishers' start over
    // one interval so their requests interleave.
    let interval = args
        .rate
        .map(|rate| Duration::from_secs_f64(per_request as f64 * args.publishers as f64 / rate));
    let offset = interval.map(|i| i.mul_f64(spec.index as f64 / args.publishers as f64));
    let p = u32::try_from(spec.index).unwrap_or(u32::MAX);
    let mut g = 0u64;
    let mut request = 0u32;
    while g < spec.count {
        if let (Some(interval), Some(offset)) = (interval, offset) {
            let at = began + offset + interval * request;
            if at >= deadline {
                break;
            }
            tokio::time::sleep_until(at).await;
        }
        if TokioInstant::now() >= deadline {
            break;
        }
        request += 1;
        let n = per_request.min(spec.count - g);
        let s = shared.now_ns();
        let mut sent_tracks = Vec::with_capacity(n as usize);
        let mut items = Vec::with_capacity(n as usize);
        for k in 0..n {
            let t = (spec.index as u64 + g + k) as usize % tracks;
            let payload = Payload {
                s,
                p,
                g: g + k,
                t: u32::try_from(t).unwrap_or(u32::MAX),
                i: next_i[t],
            };
            next_i[t] += 1;
            sent_tracks.push(t);
            items.push(payload.to_json(&pad));
        }
        g += n;
        let call = send(&spec.endpoint, &client, &shared.names, &sent_tracks, &items);
        out.first_send_ns.get_or_insert(s);
        out.requests += 1;
        let result = match tokio::time::timeout_at(deadline, call).await {
            Ok(result) => result,
            Err(_) => Err("no answer before --timeout".into()),
        };
        match result {
            Ok(()) => {
                out.last_ack_ns = shared.now_ns();
                for t in sent_tracks {
                    out.ok[t] += 1;
                }
            }
            Err(e) => {
                out.failed += n;
                out.error.get_or_insert(e);
            }
        }
    }
    out
}

/// Sends one request; `Err` says why it failed.
async fn send(
    endpoint: &Endpoint,
    client: &reqwest::Client,
    names: &[String],
    tracks: &[usize],
    items: &[String],
) -> Result<(), String> {
    let request = match endpoint {
        Endpoint::Dolores { url, key } => {
            let body = if items.len() == 1 {
                format!(
                    r#"{{"track":"{}","message":{}}}"#,
                    names[tracks[0]], items[0]
                )
            } else {
                let mut body = String::from(r#"{"updates":["#);
                for (k, (t, item)) in tracks.iter().zip(items).enumerate() {
                    if k > 0 {
                        body.push(',');
                    }
                    let _ = write!(body, r#"{{"track":"{}","message":{item}}}"#, names[*t]);
                }
                body.push_str("]}");
                body
            };
            client
                .post(url)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(body)
        }
        Endpoint::Foreign {
            urls,
            body,
            headers,
        } => {
            let message = &items[0];
            let escaped = serde_json::to_string(message).unwrap_or_default();
            let escaped = escaped.trim_start_matches('"').trim_end_matches('"');
            let name = &names[tracks[0]];
            let body = expand(
                body,
                &[
                    ("{message_escaped}", escaped),
                    ("{message}", message),
                    ("{track}", name),
                ],
            );
            let mut request = client
                .post(&urls[tracks[0]])
                .header("content-type", "application/json")
                .body(body);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            request
        }
    };
    let response = request
        .send()
        .await
        .map_err(|e| format!("publishing: {}", causes(&e)))?;
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "publishing: HTTP {}: {}",
            status.as_u16(),
            String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
        ))
    }
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

/// Publish: runs every publisher to the end of its share (or the deadline).
async fn publish_all(
    plan: &Plan,
    shared: &Arc<Shared>,
    client: &reqwest::Client,
    args: &Arc<BenchArgs>,
    deadline: TokioInstant,
) -> Vec<Published> {
    let began = TokioInstant::now();
    let handles: Vec<_> = plan
        .publishers
        .iter()
        .map(|spec| {
            tokio::spawn(publish(
                spec.clone(),
                shared.clone(),
                client.clone(),
                args.clone(),
                began,
                deadline,
            ))
        })
        .collect();
    let mut published = Vec::with_capacity(handles.len());
    for handle in handles {
        published.push(handle.await.unwrap_or_default());
    }
    published
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_targets() {
        for ok in [
            "http://127.0.0.1:8007",
            "http://127.9.8.7",
            "http://localhost:1",
            "http://LOCALHOST:1",
            "http://[::1]:8007",
        ] {
            assert!(loopback_url(ok, &["http"]).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8007",
            "http://192.168.1.1",
            "http://example.com",
            "http://[::2]:1",
            "http://localhost.example.com",
            "http://0.0.0.0:8007",
        ] {
            let e = loopback_url(bad, &["http"]).expect_err(bad).to_string();
            assert!(e.contains("only loads loopback"), "{e}");
        }
        assert!(loopback_url("https://127.0.0.1", &["http"]).is_err());
    }

    #[test]
    fn padding_makes_messages_about_the_size_asked() {
        let pad = padding(200);
        let json = Payload {
            s: 1_000_000_000,
            p: 1,
            g: 2,
            t: 0,
            i: 2,
        }
        .to_json(&pad);
        assert!((180..=200).contains(&json.len()), "{}", json.len());
        assert_eq!(padding(0), "");
    }
}
