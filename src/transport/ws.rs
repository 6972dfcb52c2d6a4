//! `GET /ws/{uid}`: the listener's deliveries as WebSocket text frames.
//!
//! Each message is one frame `{"id", "track", "message"}`; a reset is
//! `{"reset": true, "id"}`. Listeners only send small control frames: anything over
//! [`MAX_INBOUND_BYTES`] closes the socket with 1009. The server pings every heartbeat.
//!
//! Close codes say why, because a browser cannot read the HTTP status of a failed
//! handshake: a stream that cannot open (bad token, unknown listener, bad request) is
//! upgraded and closed at once with `4000 + HTTP status` and the error code as reason;
//! 1001 is a shutdown, 4008 a reader too slow to take its frames; 1011 a store failure.

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message as Frame, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};

use super::{Deliveries, Delivery, End, ListenRequest};
use crate::error::ApiError;
use crate::metrics::Transport;
use crate::server::AppState;

/// Largest frame a listener may send: it only ever needs control frames.
pub const MAX_INBOUND_BYTES: usize = 64 * 1024;
/// How long a write may wait for the reader before the socket is closed as too slow.
/// Generous: a phone on a bad network is slow, not gone.
const SLOW_READER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most frames written before one flush.
const MAX_FRAMES_PER_FLUSH: usize = 256;

/// Close code for a shutdown: come back later, elsewhere.
pub const CLOSE_SHUTDOWN: u16 = 1001;
/// Close code for a reader that did not take its frames in time.
pub const CLOSE_SLOW_READER: u16 = 4008;

/// The handler.
pub async fn listen(
    State(state): State<AppState>,
    request: ListenRequest,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(e) => {
            return ApiError::bad_field("not_websocket", format!("{e}: open it as a WebSocket"))
                .into_response();
        }
    };
    if !super::origin_allowed(&state, &request) {
        // Named in the log: behind a proxy that does not forward the host, every
        // same-origin page lands here, and the operator needs to see why.
        let client = request.client(&state);
        let origin = request
            .headers
            .get("origin")
            .map(|o| o.to_str().unwrap_or("?"));
        tracing::warn!(
            "refused a WebSocket from {client} at origin {:?}: neither this server ({:?}) nor in cors_origins",
            origin.unwrap_or_default(),
            client.host.as_deref().unwrap_or_default(),
        );
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this page's origin is not in cors_origins",
        )
        .into_response();
    }
    let opened = super::open(&state, &request).await;
    upgrade
        .max_message_size(MAX_INBOUND_BYTES)
        .max_frame_size(MAX_INBOUND_BYTES)
        .on_upgrade(move |socket| async move {
            match opened {
                Ok(deliveries) => serve(state, deliveries, socket).await,
                Err(e) => close(socket, 4000 + e.status.as_u16(), e.code).await,
            }
        })
}

async fn close(mut socket: WebSocket, code: u16, reason: &'static str) {
    let frame = Frame::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(frame)).await;
}

fn text(bytes: bytes::Bytes) -> Option<Frame> {
    Utf8Bytes::try_from(bytes).ok().map(Frame::Text)
}

async fn serve(state: AppState, mut deliveries: Deliveries, socket: WebSocket) {
    let _open = state.metrics.open_stream(Transport::Ws);
    let every = state.settings.heartbeat;
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut sink, mut inbound) = socket.split();
    let (code, reason) = loop {
        let frames: Vec<Frame> = tokio::select! {
            biased;
            () = state.shutdown.cancelled() => break (CLOSE_SHUTDOWN, "server shutting down"),
            frame = inbound.next() => match frame {
                Some(Ok(Frame::Close(_))) | None => return,
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    // tungstenite's capacity error ("Message too long: …") is not
                    // reachable as a type through axum; its text is stable.
                    if e.to_string().to_ascii_lowercase().contains("too long") {
                        break (1009, "frame too big");
                    }
                    return;
                }
            },
            delivery = deliveries.next() => match delivery {
                Ok(Delivery::Message(first)) => {
                    let mut frames = Vec::new();
                    frames.extend(text(first.json_event()));
                    while frames.len() < MAX_FRAMES_PER_FLUSH {
                        let Some(next) = deliveries.take_ready() else { break };
                        frames.extend(text(next.json_event()));
                    }
                    state.metrics.delivered(frames.len());
                    frames
                }
                Ok(Delivery::Reset { head }) => {
                    let reset = format!("{{\"reset\":true,\"id\":\"{head}\"}}");
                    vec![Frame::Text(reset.into())]
                }
                Err(End::Forgotten) => break (4404, "unknown_listener"),
                Err(End::Store) => break (1011, "store_unavailable"),
            },
            _ = heartbeat.tick() => vec![Frame::Ping(bytes::Bytes::new())],
        };
        let write = async {
            for frame in frames {
                sink.feed(frame).await?;
            }
            sink.flush().await
        };
        match tokio::time::timeout(SLOW_READER_TIMEOUT, write).await {
            Ok(Ok(())) => deliveries.ack(),
            Ok(Err(_)) => return,
            Err(_) => break (CLOSE_SLOW_READER, "slow reader"),
        }
    };
    let frame = Frame::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(frame)).await;
}
