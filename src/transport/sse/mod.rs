//! `GET /listen/{uid}`: the listener's deliveries as Server-Sent Events.
//!
//! The body starts with a `retry:` line, then every delivery as `id:` + `data:`, a
//! `reset` event when the cursor was too old, and a comment every heartbeat so proxies
//! and browsers see the connection alive. Everything ready at once is written as one
//! chunk. The stream ends on shutdown (with a last comment telling the client to come
//! back), when the listener is forgotten, or when the client goes away.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};

use super::{Deliveries, Delivery, End, ListenRequest};

mod direct;

use crate::error::ApiError;
use crate::metrics::Transport;
use crate::node::Node;
pub(crate) use direct::serve_direct;

/// How long a browser waits before reconnecting after the stream drops, in ms. Short,
/// because a reconnect costs little and resumes exactly.
const RETRY_MS: u32 = 2000;
/// Most bytes written as one chunk: coalescing stops here so one write stays small.
const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// `GET /listen/{uid}` through the framework (a request after the first of its
/// connection, or over TLS).
pub(crate) async fn listen(
    State(state): State<Node>,
    request: ListenRequest,
) -> Result<Response, ApiError> {
    request.check_origin(&state, "an SSE stream")?;
    let deliveries = super::open(&state, &request).await?;
    let stream = SseStream::new(state, deliveries);
    let body = Body::from_stream(futures_util::stream::unfold(stream, |mut s| async move {
        s.next_chunk()
            .await
            .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), s))
    }));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The state of one open SSE response.
struct SseStream {
    state: Node,
    deliveries: Deliveries,
    heartbeat: tokio::time::Interval,
    _open: crate::metrics::OpenStream,
    started: bool,
    done: bool,
}

impl SseStream {
    fn new(state: Node, deliveries: Deliveries) -> Self {
        let every = state.settings.heartbeat.max(Duration::from_millis(100));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let open = state.metrics.open_stream(Transport::Sse);
        Self {
            state,
            deliveries,
            heartbeat,
            _open: open,
            started: false,
            done: false,
        }
    }

    /// The first bytes of the body: the reconnect delay and a comment.
    fn welcome(&mut self) -> Bytes {
        self.started = true;
        Bytes::from(format!("retry: {RETRY_MS}\n: welcome\n\n"))
    }

    /// The next bytes to write, or `None` to end the response.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if !self.started {
            return Some(self.welcome());
        }
        // Shutdown comes as a delivery too (the hub wakes every stream once): nothing
        // here watches for it on each wake-up.
        let delivery = tokio::select! {
            biased;
            d = self.deliveries.next() => d,
            _ = self.heartbeat.tick() => {
                self.deliveries.ack();
                return Some(Bytes::from_static(b": heartbeat\n\n"));
            }
        };
        match delivery {
            Ok(Delivery::Message(first)) => {
                let first = first.sse_frame();
                // The common case, one message ready: its shared frame as it is, no copy.
                let Some(second) = self.deliveries.take_ready() else {
                    self.deliveries.ack();
                    self.state.metrics.delivered(1);
                    return Some(first);
                };
                let mut chunk = BytesMut::with_capacity(first.len() * 4);
                chunk.put(first);
                chunk.put(second.sse_frame());
                let mut count = 2;
                while chunk.len() < MAX_CHUNK_BYTES {
                    let Some(next) = self.deliveries.take_ready() else {
                        break;
                    };
                    chunk.put(next.sse_frame());
                    count += 1;
                }
                self.deliveries.ack();
                self.state.metrics.delivered(count);
                Some(chunk.freeze())
            }
            Ok(Delivery::Reset { head }) => {
                self.deliveries.ack();
                Some(Bytes::from(format!(
                    "id: {head}\nevent: reset\ndata: {{\"reset\":true}}\n\n"
                )))
            }
            Err(End::Forgotten) => {
                self.done = true;
                Some(Bytes::from_static(b": listener forgotten\n\n"))
            }
            Err(End::Shutdown) => {
                self.done = true;
                Some(Bytes::from_static(b": server shutting down, reconnect\n\n"))
            }
            Err(End::Store) => None,
        }
    }
}
