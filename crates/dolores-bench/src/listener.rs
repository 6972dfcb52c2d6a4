//! One task per listener: open the stream (SSE, WebSocket or long-poll), then read
//! until told to stop, checking each message and recording its latency.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_util::sync::CancellationToken;

use super::Transport;
use super::check::Checker;
use super::wire::{self, HttpConn, Parsed, SseEvent, SseParser};

/// Latencies kept by a listener before they go into a shared histogram.
const LATENCY_BATCH: usize = 256;
/// Longest a long-poll request waits, in seconds.
const POLL_WAIT_SECONDS: u64 = 25;
/// Most bytes of one long-poll answer.
const MAX_POLL_BODY: usize = 64 * 1024 * 1024;
/// Most bytes of an error answer kept for the report.
const MAX_ERROR_BODY: usize = 4096;

/// Where and how one listener connects.
#[derive(Debug, Clone)]
pub(super) struct ListenerSpec {
    /// The listener's uid (what Dolores knows it by).
    pub(super) uid: String,
    /// Where to connect.
    pub(super) addr: SocketAddr,
    /// The `Host` header.
    pub(super) host: String,
    /// Path and query of the stream.
    pub(super) target: String,
    /// The source address to bind, if any.
    pub(super) source: Option<IpAddr>,
    /// The tracks (indices) it is on.
    pub(super) tracks: Vec<u32>,
}

/// What every listener shares.
#[derive(Debug)]
pub(super) struct Shared {
    /// The common clock start: payload send times are ns since this.
    pub(super) start: Instant,
    /// Track names, by index.
    pub(super) names: Vec<String>,
    /// Publishers in the run.
    pub(super) publishers: usize,
    /// The transport.
    pub(super) transport: Transport,
    /// Bounds how many listeners connect at once.
    pub(super) gate: Semaphore,
    /// Listeners whose stream is open.
    pub(super) connected: AtomicUsize,
    /// Listeners that gave up connecting.
    pub(super) failed: AtomicUsize,
    /// Listener tasks still reading.
    pub(super) alive: AtomicUsize,
    /// Connected listeners per track.
    pub(super) on_track: Vec<AtomicU64>,
    /// Distinct expected messages received, over all listeners.
    pub(super) unique: AtomicU64,
    /// When the last distinct message came, ns since `start`.
    pub(super) last_delivery_ns: AtomicU64,
    /// When the last stream opened, ns since `start`.
    pub(super) last_connect_ns: AtomicU64,
    /// End-to-end latency in µs, sharded so listeners rarely wait for each other.
    pub(super) latency: Vec<Mutex<Histogram<u64>>>,
    /// Time to open each stream, in µs.
    pub(super) connect_latency: Mutex<Histogram<u64>>,
    /// Tells every listener to stop reading.
    pub(super) stop: CancellationToken,
}

/// A histogram of µs from 1 µs to an hour, 3 significant digits.
pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// ns since the common start.
    pub(super) fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// How one listener ended.
#[derive(Debug)]
pub(super) struct Outcome {
    /// Whether its stream opened.
    pub(super) connected: bool,
    /// Whether the stream ended before the run did.
    pub(super) dropped: bool,
    /// Why it could not connect, or why it dropped.
    pub(super) error: Option<String>,
    /// What it received.
    pub(super) checker: Checker,
}

/// The listener's reading state.
struct Reader<'a> {
    shared: &'a Shared,
    shard: usize,
    checker: Checker,
    latencies: Vec<u64>,
    /// Distinct messages since the last report to `shared.unique`.
    fresh: u64,
}

impl Reader<'_> {
    fn event(&mut self, parsed: Parsed<'_>, now_ns: u64) {
        match parsed {
            Parsed::Message { track, payload } => {
                let names = &self.shared.names;
                let track_ok = match &track {
                    None => true,
                    Some(name) => names.get(payload.t as usize).is_some_and(|n| n == name),
                };
                if self.checker.message(payload, track_ok) {
                    self.fresh += 1;
                    self.latencies.push(now_ns.saturating_sub(payload.s) / 1000);
                    if self.latencies.len() >= LATENCY_BATCH {
                        self.flush_latencies();
                    }
                }
            }
            Parsed::Reset => self.checker.reset(),
            Parsed::Garbled => self.checker.garbled(),
        }
    }

    /// Reports what came since the last call to the shared counters.
    fn settle(&mut self, now_ns: u64) {
        if self.fresh > 0 {
            self.shared.unique.fetch_add(self.fresh, Ordering::Relaxed);
            self.shared
                .last_delivery_ns
                .fetch_max(now_ns, Ordering::Relaxed);
            self.fresh = 0;
        }
    }

    fn flush_latencies(&mut self) {
        let mut histogram = lock(&self.shared.latency[self.shard]);
        for &us in &self.latencies {
            histogram.saturating_record(us.max(1));
        }
        self.latencies.clear();
    }
}

/// Runs one listener to the end of the run.
pub(super) async fn run(shared: Arc<Shared>, index: usize, spec: ListenerSpec) -> Outcome {
    let checker = Checker::new(spec.tracks.clone(), shared.publishers);
    let mut reader = Reader {
        shared: &shared,
        shard: index % shared.latency.len(),
        checker,
        latencies: Vec::new(),
        fresh: 0,
    };
    let opened = {
        let _permit = shared.gate.acquire().await;
        let began = Instant::now();
        let opened = tokio::select! {
            biased;
            () = shared.stop.cancelled() => Err("the run ended before the stream opened".to_owned()),
            opened = open(&shared, &spec) => opened,
        };
        if opened.is_ok() {
            let us = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
            lock(&shared.connect_latency).saturating_record(us.max(1));
        }
        opened
    };
    let stream = match opened {
        Ok(stream) => stream,
        Err(error) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return Outcome {
                connected: false,
                dropped: false,
                error: Some(format!("{}: {error}", spec.uid)),
                checker: reader.checker,
            };
        }
    };
    for &track in &spec.tracks {
        if let Some(count) = shared.on_track.get(track as usize) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
    shared.alive.fetch_add(1, Ordering::Relaxed);
    shared
        .last_connect_ns
        .fetch_max(shared.now_ns(), Ordering::Relaxed);
    shared.connected.fetch_add(1, Ordering::Relaxed);

    let ended = match stream {
        Open::Sse(conn, decoder, body) => read_sse(&mut reader, conn, decoder, body).await,
        Open::Ws(socket) => read_ws(&mut reader, socket).await,
        Open::Poll(conn) => read_poll(&mut reader, conn, &spec).await,
    };
    reader.settle(shared.now_ns());
    reader.flush_latencies();
    shared.alive.fetch_sub(1, Ordering::Relaxed);
    Outcome {
        connected: true,
        dropped: ended.is_some(),
        error: ended.map(|e| format!("{}: {e}", spec.uid)),
        checker: reader.checker,
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// An open stream.
enum Open {
    Sse(HttpConn, wire::BodyDecoder, BytesMut),
    Ws(Box<WsStream>),
    Poll(HttpConn),
}

async fn open(shared: &Shared, spec: &ListenerSpec) -> Result<Open, String> {
    let stream = wire::tcp_connect(spec.addr, spec.source)
        .await
        .map_err(|e| match spec.source {
            Some(source) => format!("cannot connect from {source} to {}: {e}", spec.addr),
            None => format!("cannot connect to {}: {e}", spec.addr),
        })?;
    let mut conn = HttpConn::new(stream);
    match shared.transport.0 {
        dolores_protocol::Transport::Sse => {
            conn.get(&spec.host, &spec.target, "text/event-stream")
                .await
                .map_err(|e| format!("sending the request: {e}"))?;
            let head = conn.read_head().await?;
            if head.status != 200 {
                return Err(refusal(&mut conn, head).await);
            }
            let mut decoder = wire::BodyDecoder::new(head.framing);
            let mut body = BytesMut::with_capacity(1024);
            conn.take_body(&mut decoder, &mut body)?;
            Ok(Open::Sse(conn, decoder, body))
        }
        dolores_protocol::Transport::Ws => {
            let url = format!("ws://{}{}", spec.host, spec.target);
            let (socket, _) = tokio_tungstenite::client_async(url, conn.into_stream())
                .await
                .map_err(|e| match e {
                    tokio_tungstenite::tungstenite::Error::Http(response) => {
                        let body = response
                            .body()
                            .as_deref()
                            .map(String::from_utf8_lossy)
                            .unwrap_or_default();
                        format!("HTTP {}: {}", response.status().as_u16(), body.trim())
                    }
                    e => format!("WebSocket handshake: {e}"),
                })?;
            Ok(Open::Ws(Box::new(socket)))
        }
        // A long-poll is open once connected: each request then waits for events.
        dolores_protocol::Transport::Poll => Ok(Open::Poll(conn)),
    }
}

async fn refusal(conn: &mut HttpConn, head: wire::Head) -> String {
    let body = tokio::time::timeout(
        Duration::from_secs(2),
        conn.read_body(head.framing, MAX_ERROR_BODY),
    )
    .await;
    let body = match body {
        Ok(Ok(body)) => String::from_utf8_lossy(&body).trim().to_owned(),
        _ => String::new(),
    };
    format!("HTTP {}: {body}", head.status)
}

/// Reads an SSE stream until the stop; returns why it ended early, if it did.
async fn read_sse(
    reader: &mut Reader<'_>,
    mut conn: HttpConn,
    mut decoder: wire::BodyDecoder,
    mut body: BytesMut,
) -> Option<String> {
    let mut parser = SseParser::default();
    let stop = reader.shared.stop.clone();
    loop {
        let now_ns = reader.shared.now_ns();
        parser.feed(&mut body, |event| match event {
            SseEvent::Data(data) => reader.event(wire::parse_event(data), now_ns),
            SseEvent::Reset => reader.checker.reset(),
        });
        reader.settle(now_ns);
        if decoder.done() {
            return Some("the server ended the stream".into());
        }
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            read = conn.read_more() => read,
        };
        match read {
            Ok(0) => return Some("the server closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Some(format!("reading the stream: {e}")),
        }
        if let Err(e) = conn.take_body(&mut decoder, &mut body) {
            return Some(e);
        }
    }
}

/// Reads WebSocket frames until the stop; returns why it ended early, if it did.
async fn read_ws(reader: &mut Reader<'_>, mut socket: Box<WsStream>) -> Option<String> {
    let stop = reader.shared.stop.clone();
    loop {
        let frame = tokio::select! {
            biased;
            () = stop.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_millis(200), socket.close(None)).await;
                return None;
            }
            frame = socket.next() => frame,
        };
        let now_ns = reader.shared.now_ns();
        match frame {
            Some(Ok(Frame::Text(text))) => reader.event(wire::parse_event(text.as_bytes()), now_ns),
            Some(Ok(Frame::Binary(data))) => reader.event(wire::parse_event(&data), now_ns),
            Some(Ok(Frame::Close(close))) => {
                return Some(match close {
                    Some(c) => format!("closed by the server: {} {}", u16::from(c.code), c.reason),
                    None => "closed by the server".into(),
                });
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Some(format!("WebSocket: {e}")),
            None => return Some("the server closed the connection".into()),
        }
        reader.settle(now_ns);
    }
}

/// Long-polls until the stop; returns why it ended early, if it did.
async fn read_poll(
    reader: &mut Reader<'_>,
    mut conn: HttpConn,
    spec: &ListenerSpec,
) -> Option<String> {
    let stop = reader.shared.stop.clone();
    let separator = if spec.target.contains('?') { '&' } else { '?' };
    let mut cursor: Option<String> = None;
    loop {
        let target = match &cursor {
            Some(id) => format!(
                "{}{separator}timeout={POLL_WAIT_SECONDS}&last_event_id={id}",
                spec.target
            ),
            None => format!("{}{separator}timeout={POLL_WAIT_SECONDS}", spec.target),
        };
        let answer = async {
            conn.get(&spec.host, &target, "application/json")
                .await
                .map_err(|e| format!("sending a poll: {e}"))?;
            let head = conn.read_head().await?;
            if head.status != 200 {
                return Err(refusal(&mut conn, head).await);
            }
            conn.read_body(head.framing, MAX_POLL_BODY).await
        };
        let body = tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            body = answer => body,
        };
        let body = match body {
            Ok(body) => body,
            Err(e) => return Some(e),
        };
        let now_ns = reader.shared.now_ns();
        let Some(polled) = wire::parse_poll(&body) else {
            return Some(format!(
                "a poll answer that is not {{\"events\": …}}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        };
        if polled.reset {
            reader.checker.reset();
        }
        // Event ids are digits; anything else would need escaping in the query.
        cursor = polled
            .last_event_id
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()))
            .map(|id| id.into_owned())
            .or(cursor);
        for event in polled.events {
            reader.event(event, now_ns);
        }
        reader.settle(now_ns);
    }
}
