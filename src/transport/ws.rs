//! `GET /ws/{uid}`: the listener's deliveries as WebSocket text frames.
//!
//! Each message is one frame `{"id", "track", "message"}`; a reset is
//! `{"reset": true, "id"}`. Listeners only send small control frames: anything over
//! [`MAX_INBOUND_BYTES`] closes the socket with 1009. The server pings every heartbeat.
//!
//! Close codes say why, because a browser cannot read the HTTP status of a failed
//! handshake: a stream that cannot open (bad token, unknown listener, bad request) is
//! upgraded and closed at once with `4000 + HTTP status` and the error code as reason;
//! 1001 is a shutdown, 4008 a reader too slow to take its frames; 1011 a store failure;
//! 1002 and 1007 a client that broke the protocol.
//!
//! Two ways in, one socket loop: a WebSocket that is its connection's first request is
//! upgraded directly on the socket ([`serve_direct`], called by `connection`), holding
//! none of hyper's per-connection state for the hours it stays open; any other (a
//! later request of a kept-alive connection, or over TLS) is upgraded through hyper
//! ([`listen`]). Either way the socket is tungstenite's with small buffers: an idle
//! WebSocket is as small as an idle SSE stream, since most of a push server's
//! connections are idle.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as Frame, Utf8Bytes};

use super::{Deliveries, Delivery, End, ListenRequest};
use crate::connection::Head;
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
/// Bytes of frames gathered before they go to the socket in one write; like SSE's
/// largest chunk.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Bytes read from the socket at a time. Listeners send pongs and a close (a few bytes
/// each), and the buffer is allocated for every open socket: tungstenite's default
/// (128 KiB) made an idle WebSocket cost ~135 KB.
const READ_BUFFER_BYTES: usize = 256;

/// Close code for a shutdown: come back later, elsewhere.
pub const CLOSE_SHUTDOWN: u16 = 1001;
/// Close code for a reader that did not take its frames in time.
pub const CLOSE_SLOW_READER: u16 = 4008;

/// The socket settings of every listener WebSocket.
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BATCH_BYTES)
        .max_message_size(Some(MAX_INBOUND_BYTES))
        .max_frame_size(Some(MAX_INBOUND_BYTES))
}

/// Whether the headers ask for a WebSocket the way RFC 6455 says; the
/// `Sec-WebSocket-Accept` value to answer with if so.
pub fn accept_key(headers: &HeaderMap) -> Option<String> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return None;
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION)?.as_bytes() != b"13" {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    Some(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// Refuses a page at a foreign origin, and says so in the log: behind a proxy that
/// does not forward the host, every same-origin page lands here, and the operator needs
/// to see why.
fn origin_refused(state: &AppState, request: &ListenRequest) -> ApiError {
    let client = request.client(state);
    let origin = request
        .headers
        .get("origin")
        .map(|o| o.to_str().unwrap_or("?"));
    tracing::warn!(
        "refused a WebSocket from {client} at origin {:?}: neither this server ({:?}) nor in cors_origins",
        origin.unwrap_or_default(),
        client.host.as_deref().unwrap_or_default(),
    );
    ApiError::new(
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
        "this page's origin is not in cors_origins",
    )
}

/// The handler of `/ws/{uid}` on the framework path.
pub async fn listen(
    State(state): State<AppState>,
    request: ListenRequest,
    raw: Request,
) -> Response {
    let Some(accept) = accept_key(&request.headers) else {
        return ApiError::bad_field(
            "not_websocket",
            "this endpoint takes a WebSocket (Upgrade: websocket, Sec-WebSocket-Version: 13)",
        )
        .into_response();
    };
    let Some(upgrade) = raw
        .into_parts()
        .0
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return ApiError::bad_field(
            "not_websocket",
            "this connection cannot be upgraded: open the WebSocket over HTTP/1.1",
        )
        .into_response();
    };
    if !super::origin_allowed(&state, &request) {
        return origin_refused(&state, &request).into_response();
    }
    let opened = super::open(&state, &request).await;
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let io = TokioIo::new(upgraded);
                let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config()));
                serve(state, opened, socket.await).await;
            }
            Err(e) => tracing::debug!("websocket upgrade failed: {e}"),
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}

/// Serves `GET /ws/{uid}` as the first request of a connection, directly on the socket
/// (see `connection`, which sends only complete upgrade requests here).
pub async fn serve_direct(mut socket: TcpStream, head: Head, state: AppState) {
    // Boxed, like SSE's: the request and the opening live on the heap only while the
    // stream opens, not in every open socket's task.
    let opened = Box::pin(async {
        let request = super::direct_request(head, &state.settings.base_path, "/ws/")?;
        let accept = accept_key(&request.headers).ok_or_else(|| {
            ApiError::bad_field("not_websocket", "this endpoint takes a WebSocket")
        })?;
        if !super::origin_allowed(&state, &request) {
            return Err(origin_refused(&state, &request));
        }
        Ok((accept, super::open(&state, &request).await))
    })
    .await;
    let (accept, opened) = match opened {
        Ok(ready) => ready,
        Err(e) => {
            super::write_error(&mut socket, &e, "").await;
            return;
        }
    };
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    if socket.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    drop(answer);
    let socket = WebSocketStream::from_raw_socket(socket, Role::Server, Some(config())).await;
    serve(state, opened, socket).await;
}

async fn close<S>(mut socket: WebSocketStream<S>, code: u16, reason: &'static str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = Frame::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(reason),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(frame)).await;
}

fn text(bytes: bytes::Bytes) -> Option<Frame> {
    Utf8Bytes::try_from(bytes).ok().map(Frame::Text)
}

/// Why the socket closes, for what the client sent: `None` when it simply went away.
fn inbound_error(e: &tungstenite::Error) -> Option<(u16, &'static str)> {
    use tungstenite::error::{CapacityError, Error};
    match e {
        Error::Capacity(CapacityError::MessageTooLong { .. }) => Some((1009, "frame too big")),
        Error::Capacity(_) => Some((1009, "frame too big")),
        Error::Utf8(_) => Some((1007, "invalid UTF-8")),
        Error::Protocol(_) => Some((1002, "protocol error")),
        _ => None,
    }
}

/// What the socket loop writes next.
enum Out {
    /// Messages: this one, then whatever else is ready.
    Messages(std::sync::Arc<crate::engine::Message>),
    /// One frame of the server's own (a reset, a ping).
    Frame(Frame),
}

async fn serve<S>(state: AppState, opened: Result<Deliveries, ApiError>, socket: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut deliveries = match opened {
        Ok(deliveries) => deliveries,
        Err(e) => return close(socket, 4000 + e.status.as_u16(), e.code).await,
    };
    let _open = state.metrics.open_stream(Transport::Ws);
    let every = state.settings.heartbeat;
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Not split: reads happen only in the select below and writes only after it, so
    // the socket needs no lock between two halves.
    let mut socket = socket;
    let (code, reason) = loop {
        let out = tokio::select! {
            biased;
            () = state.shutdown.cancelled() => break (CLOSE_SHUTDOWN, "server shutting down"),
            frame = socket.next() => match frame {
                Some(Ok(Frame::Close(_))) | None => return,
                Some(Ok(_)) => continue,
                Some(Err(e)) => match inbound_error(&e) {
                    Some(why) => break why,
                    None => return,
                },
            },
            delivery = deliveries.next() => match delivery {
                Ok(Delivery::Message(first)) => Out::Messages(first),
                Ok(Delivery::Reset { head }) => {
                    Out::Frame(Frame::Text(format!("{{\"reset\":true,\"id\":\"{head}\"}}").into()))
                }
                Err(End::Forgotten) => break (4404, "unknown_listener"),
                Err(End::Store) => break (1011, "store_unavailable"),
            },
            _ = heartbeat.tick() => Out::Frame(Frame::Ping(bytes::Bytes::new())),
        };
        let write = async {
            match out {
                Out::Messages(first) => {
                    let mut count = 0;
                    let mut next = Some(first);
                    // Everything ready goes out with one flush (one write, usually).
                    while let Some(message) = next.take() {
                        if let Some(frame) = text(message.json_event()) {
                            socket.feed(frame).await?;
                            count += 1;
                        }
                        if count < MAX_FRAMES_PER_FLUSH {
                            next = deliveries.take_ready();
                        }
                    }
                    state.metrics.delivered(count);
                }
                Out::Frame(frame) => socket.feed(frame).await?,
            }
            socket.flush().await
        };
        match tokio::time::timeout(SLOW_READER_TIMEOUT, write).await {
            Ok(Ok(())) => deliveries.ack(),
            Ok(Err(_)) => return,
            Err(_) => break (CLOSE_SLOW_READER, "slow reader"),
        }
    };
    let frame = Frame::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(reason),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(frame)).await;
}
