//! `GET /ws/{uid}`: the listener's deliveries as WebSocket text frames.
//!
//! Each message is one frame `{"id", "track", "message"}`; a reset is
//! `{"reset": true, "id"}`. Listeners only send small control frames: anything over
//! [`MAX_INBOUND_BYTES`] closes the socket with 1009. The server pings every heartbeat.
//!
//! Close codes say why, because a browser cannot read the HTTP status of a failed
//! handshake: a stream that cannot open (bad token, unknown listener, bad request) is
//! upgraded and closed at once with `4000 + HTTP status` and the error code as reason;
//! 1001 is a shutdown, 4008 a reader that took no frame for `slow_reader_timeout` (the
//! frame the timeout cut is finished first, so the close frame can be read); 1011 a
//! store failure; 1002 and 1007 a client that broke the protocol. A page at a foreign
//! origin is refused with 403 before the upgrade, as on every listener endpoint.
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
use bytes::{BufMut, Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;

use frame::{Inbound, Opcode, ReadError, Reader};

use super::Head;
use super::{Deliveries, Delivery, End, ListenRequest};
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Transport;
use crate::node::Node;

mod frame;

/// Largest frame a listener may send: it only ever needs control frames.
pub(crate) const MAX_INBOUND_BYTES: usize = 64 * 1024;
/// Most bytes written at once when several messages are ready, like SSE's largest
/// chunk.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// Every reason the server closes a WebSocket, and the code each sends (RFC 6455 §7.4
/// for the 1000s; 4000 + an HTTP status for the server's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseCode {
    /// 1000, or the code the client closed with, echoed (§5.5.1).
    Echo(Option<u16>),
    /// 1001: the server is shutting down; come back later, elsewhere.
    Shutdown,
    /// 1002: a frame RFC 6455 does not allow.
    ProtocolError,
    /// 1007: text that is not UTF-8.
    NotUtf8,
    /// 1009: a frame larger than [`MAX_INBOUND_BYTES`].
    TooBig,
    /// 1011: the store failed; retry later.
    StoreFailed,
    /// 4008: a reader that took no frame for `slow_reader_timeout`.
    SlowReader,
    /// 4000 + the HTTP status: the stream could not open (bad token, unknown listener…),
    /// or its listener was forgotten (4404); the reason is the error code.
    Refused(StatusCode),
}

impl CloseCode {
    /// The number sent in the close frame.
    pub(crate) fn code(self) -> u16 {
        match self {
            Self::Echo(code) => code.unwrap_or(1000),
            Self::Shutdown => 1001,
            Self::ProtocolError => 1002,
            Self::NotUtf8 => 1007,
            Self::TooBig => 1009,
            Self::StoreFailed => 1011,
            Self::SlowReader => 4008,
            Self::Refused(status) => 4000 + status.as_u16(),
        }
    }
}

/// Whether the headers ask for a WebSocket the way RFC 6455 says; the
/// `Sec-WebSocket-Accept` value to answer with if so.
pub(crate) fn accept_key(headers: &HeaderMap) -> Option<String> {
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

/// The handler of `/ws/{uid}` on the framework path.
pub(crate) async fn listen(
    State(state): State<Node>,
    request: ListenRequest,
    raw: Request,
) -> Response {
    let Some(accept) = accept_key(&request.headers) else {
        return ApiError::bad_field(
            ErrorCode::NotWebsocket,
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
            ErrorCode::NotWebsocket,
            "this connection cannot be upgraded: open the WebSocket over HTTP/1.1",
        )
        .into_response();
    };
    if let Err(refused) = request.check_origin(&state, "a WebSocket") {
        return refused.into_response();
    }
    let opened = super::open(&state, &request).await;
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let (reader, writer) = tokio::io::split(TokioIo::new(upgraded));
                serve(state, opened, reader, writer).await;
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
pub(crate) async fn serve_direct(mut socket: TcpStream, head: Head, state: Node) {
    // Boxed, like SSE's: the request and the opening live on the heap only while the
    // stream opens, not in every open socket's task.
    let opened = Box::pin(async {
        let request =
            super::direct::listen_request(head, &state.settings.base_path, Transport::Ws.prefix())?;
        let accept = accept_key(&request.headers).ok_or_else(|| {
            ApiError::bad_field(ErrorCode::NotWebsocket, "this endpoint takes a WebSocket")
        })?;
        request.check_origin(&state, "a WebSocket")?;
        Ok((accept, super::open(&state, &request).await))
    })
    .await;
    let (accept, opened) = match opened {
        Ok(ready) => ready,
        Err(e) => {
            super::direct::write_error(&mut socket, &e, "").await;
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
    let (reader, writer) = socket.split();
    serve(state, opened, reader, writer).await;
}

/// Sends a close frame (waiting at most a second for a reader that does not read),
/// then ends the connection.
async fn close<W: AsyncWrite + Unpin>(writer: &mut W, code: CloseCode, reason: &str) {
    close_after(writer, &[], code, reason).await;
}

/// Writes `rest` (the end of a frame already partly written), then a close frame, then
/// ends the connection; all of it within a second for a reader that does not read.
async fn close_after<W: AsyncWrite + Unpin>(
    writer: &mut W,
    rest: &[u8],
    code: CloseCode,
    reason: &str,
) {
    let frame = frame::close(code.code(), reason);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        writer.write_all(rest).await?;
        writer.write_all(&frame).await?;
        writer.shutdown().await
    })
    .await;
}

/// Writes all of `bytes`, counting in `written` how much went out: when a slow reader's
/// timeout cuts the write off, the count says where the cut frame ends.
async fn write_counted<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    written: &mut usize,
) -> std::io::Result<()> {
    while *written < bytes.len() {
        let n = writer.write(&bytes[*written..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        *written += n;
    }
    writer.flush().await
}

/// What the socket loop writes next.
enum Out {
    /// Messages: this one, then whatever else is ready.
    Messages(std::sync::Arc<crate::engine::Message>),
    /// A frame of the server's own (a reset, a ping, a pong).
    Frame(Vec<u8>),
}

async fn serve<R, W>(
    state: Node,
    opened: Result<Deliveries, ApiError>,
    mut reader: R,
    mut writer: W,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut deliveries = match opened {
        Ok(deliveries) => deliveries,
        Err(e) => return close(&mut writer, CloseCode::Refused(e.status), e.code.as_str()).await,
    };
    let _open = state.metrics.open_stream(Transport::Ws);
    let every = state.settings.heartbeat;
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inbound = Reader::new(MAX_INBOUND_BYTES);
    let (code, reason) = loop {
        let out = tokio::select! {
            biased;
            // Shutdown comes from `deliveries` (the hub wakes every stream once).
            // One frame at a time, and its answer written before the next is read: a
            // client that floods pings and never reads is held back by its own pongs.
            frame = inbound.next(&mut reader) => match frame {
                Ok(Inbound::Ping(payload)) => Out::Frame(frame::short(Opcode::Pong, &payload)),
                Ok(Inbound::Ignored) => continue,
                Ok(Inbound::Close(code)) => {
                    // Echo the client's code (RFC 6455 §5.5.1), then hang up.
                    return close(&mut writer, CloseCode::Echo(code), "").await;
                }
                Err(ReadError::Gone) => return,
                Err(ReadError::Violation(violation)) => break violation.close(),
            },
            delivery = deliveries.next() => match delivery {
                Ok(Delivery::Message(first)) => Out::Messages(first),
                Ok(Delivery::Reset { head }) => {
                    let reset = format!("{{\"reset\":true,\"id\":\"{head}\"}}");
                    Out::Frame(frame::short(Opcode::Text, reset.as_bytes()))
                }
                Err(End::Forgotten) => {
                    break (CloseCode::Refused(StatusCode::NOT_FOUND), ErrorCode::UnknownListener.as_str())
                }
                Err(End::Store) => break (CloseCode::StoreFailed, ErrorCode::StoreUnavailable.as_str()),
                Err(End::Shutdown) => break (CloseCode::Shutdown, "server shutting down"),
            },
            _ = heartbeat.tick() => Out::Frame(frame::short(Opcode::Ping, b"")),
        };
        let (bytes, delivered) = match out {
            Out::Messages(first) => {
                let first = first.ws_frame();
                // The common case, one message ready: its shared frame as it is.
                match deliveries.take_ready() {
                    None => (first, 1),
                    Some(second) => {
                        let mut chunk = BytesMut::with_capacity(first.len() * 4);
                        chunk.put(first);
                        chunk.put(second.ws_frame());
                        let mut count = 2;
                        while chunk.len() < WRITE_BATCH_BYTES {
                            let Some(next) = deliveries.take_ready() else {
                                break;
                            };
                            chunk.put(next.ws_frame());
                            count += 1;
                        }
                        (chunk.freeze(), count)
                    }
                }
            }
            Out::Frame(frame) => (Bytes::from(frame), 0),
        };
        let mut written = 0;
        let write = write_counted(&mut writer, &bytes, &mut written);
        match tokio::time::timeout(state.settings.slow_reader_timeout, write).await {
            Ok(Ok(())) => {
                if delivered > 0 {
                    state.metrics.delivered(delivered);
                }
                deliveries.ack();
            }
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::info!(
                    "closing the WebSocket of {} with {}: it took no frame for {:?}",
                    deliveries.uid(),
                    CloseCode::SlowReader.code(),
                    state.settings.slow_reader_timeout
                );
                // The close frame goes after the end of the frame the timeout cut, or
                // the reader would take it for the rest of that frame.
                let rest = &bytes[written..frame::frame_end(&bytes, written)];
                return close_after(&mut writer, rest, CloseCode::SlowReader, "slow reader").await;
            }
        }
    };
    close(&mut writer, code, reason).await;
}
